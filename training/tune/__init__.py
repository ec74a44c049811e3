"""Optuna tuning: study config and search spaces, storage, objectives, the trial runner, status."""
