"""Stage 7, evaluate: per-case metrics against harmonized ground truth, aggregated with dask."""
