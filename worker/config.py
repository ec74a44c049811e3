"""Worker and broker settings (``SORTLINE_*`` environment variables, then ``.env``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import SecretStr, field_validator
from pydantic_settings import NoDecode

from db.config import SortlineSettings, settings_getter


class WorkerSettings(SortlineSettings):
    """Settings of the Celery app, the inference tasks and the local stack."""

    broker_url: str = "redis://localhost:6379/0"
    model: str = ""  # checkpoint path; empty: the active registered model, else the shipped one
    model_check_interval: float = 5.0  # seconds between looks at the registry's active model
    device: str = "auto"  # auto | cpu | cuda
    runtime: str = "auto"  # auto (ONNX Runtime on CPU, PyTorch on CUDA) | onnx | torch
    precision: str = "auto"  # auto (int8 where the checkpoint has a calibration) | fp32 | int8
    max_batch: int = 8  # micro-batching: images per forward pass at most
    max_wait_ms: float = 20.0  # ... and how long the first image may wait for others
    allowed_roots: Annotated[list[str], NoDecode] = []  # empty: any path; split below
    max_image_bytes: int = 20_000_000
    max_image_pixels: int = 50_000_000
    bytes_dir: str = ""  # keep submitted bytes here, content-addressed ('' : not kept)
    bytes_keep_mb: int = 1024  # ... pruning the least recently submitted beyond this
    visibility_timeout: int = 3600
    task_time_limit: int = 300
    task_max_retries: int = 5
    torch_threads: int = 0  # 0: the worker's share of the cores
    review_threshold: float = 0.6
    unfamiliar_threshold: float | None = None  # None: the threshold stored in the checkpoint
    home: str = ".sortline"  # logs and pid files of `sortline up`
    flower_port: int = 5555
    flower_user: str = ""
    flower_password: SecretStr | None = None

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, v):
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                import json

                return json.loads(v)
            return [p for p in v.split(os.pathsep if os.pathsep in v else ",") if p]
        return v

    def resolved_roots(self) -> list[Path]:
        return [Path(r).resolve() for r in self.allowed_roots]


@settings_getter
def get_worker_settings() -> WorkerSettings:
    """The worker settings."""
    return WorkerSettings()
