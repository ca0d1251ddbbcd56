"""gears_dist.evaluate: metrics, baselines, genetic interactions, figures, reports, prediction.

- metrics: per-condition metrics on cell-averaged profiles (GEARS' definitions), from store stats.
- baselines: control mean, train mean, additive, linear PCA model (fitted on the training split).
- gi: genetic-interaction scores of pairs, ranked lists per GI type, precision@k vs ground truth.
- pipeline: evaluate a split's test conditions for the model and the baselines; GI evaluation; figures.
- plots, report (terminal table, JSON/CSV, MLflow), export (cell-eval AnnData layout).
- predict: load a trained run and predict any perturbation sets; commands: `gears-dist evaluate/predict`.
"""
