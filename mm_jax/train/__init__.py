"""Training: the model on its mesh (state), optimizer and freeze rules, sharding, metrics, the loop."""
