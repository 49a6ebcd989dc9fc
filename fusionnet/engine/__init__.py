"""The engine: fit (the training loop), the optimiser, callbacks, the run folder's writer, inference, the feature cache."""
