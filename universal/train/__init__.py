"""Stage 5, train: patches from the store, partial-label targets and loss, the training loop, its checkpoints
and distributed set-up."""
