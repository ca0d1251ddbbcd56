"""Data layer: the Zarr store, ingest from AnnData, statistics, splits, the streaming loader, synthetic screens."""
