"""Training, evaluation and the pieces the worker shares: model factory, preprocessing, checkpoints."""
