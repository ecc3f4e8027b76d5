"""Tasks: what a model is trained and evaluated on (its inputs, loss, batches, evaluator)."""
