"""Training settings and the default checkpoint path (the worker imports it from here)."""

from __future__ import annotations

from pathlib import Path

from db.config import SortlineSettings, settings_getter

_REPO = Path(__file__).resolve().parents[1]  # a source checkout (editable install)
DEFAULT_CHECKPOINT = _REPO / "models" / "sortline-trashnet.safetensors"
SAMPLES_DIR = _REPO / "samples"  # the demo photos (TrashNet, see samples/CREDITS.md)


class TrainingSettings(SortlineSettings):
    """Where training keeps its caches and runs (``SORTLINE_CACHE_DIR``, ``SORTLINE_RUNS_DIR``)."""

    cache_dir: Path = _REPO / "cache"
    runs_dir: Path = _REPO / "runs"


@settings_getter
def get_training_settings() -> TrainingSettings:
    """The training settings."""
    return TrainingSettings()


class TuneSettings(SortlineSettings):
    """Settings of hyper-parameter studies (``SORTLINE_TUNE_*``)."""

    tune_storage: str = ""  # empty: SORTLINE_DATABASE_URL
    tune_heartbeat_interval: int = 30
    tune_grace_period: int = 90
    tune_max_retry: int = 3
    tune_time_limit: int = 7200


@settings_getter
def get_tune_settings() -> TuneSettings:
    """The settings of hyper-parameter studies."""
    return TuneSettings()
