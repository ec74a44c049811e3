"""Training settings and the default checkpoint path (the worker imports it from here)."""

from __future__ import annotations

from pathlib import Path

from db.config import SortlineSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO_ROOT / "models" / "sortline-trashnet.safetensors"


class TrainingSettings(SortlineSettings):
    """Where training keeps its caches and runs (``SORTLINE_CACHE_DIR``, ``SORTLINE_RUNS_DIR``)."""

    cache_dir: Path = REPO_ROOT / "cache"
    runs_dir: Path = REPO_ROOT / "runs"


def get_training_settings() -> TrainingSettings:
    """Read the training settings from the environment now."""
    return TrainingSettings()
