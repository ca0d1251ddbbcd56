"""gears_dist: distributed, out-of-core training of GEARS on Perturb-seq screens of any size."""

__version__ = "0.1.0"
