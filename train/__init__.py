"""train: the training stack shared by every stage (data, optimizer, step, checkpoints, loop)."""
