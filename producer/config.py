"""Producer settings (``SORTLINE_*`` environment variables, then ``.env``)."""

from __future__ import annotations

from db.config import SortlineSettings, settings_getter
from sortline.names import CPU_QUEUE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class ProducerSettings(SortlineSettings):
    """How jobs are cut into tasks."""

    batch_size: int = 16
    queue: str = CPU_QUEUE
    max_queued: int = 10_000  # images waiting per queue before producers wait; 0: no limit


@settings_getter
def get_producer_settings() -> ProducerSettings:
    """The producer settings."""
    return ProducerSettings()
