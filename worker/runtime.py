"""The model in a worker process: loaded once on first use, after fork, never CUDA in the parent."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.checkpoint import CheckpointError, file_sha256, model_version, read_metadata
from training.preprocess import PreprocessSpec
from worker.config import get_worker_settings

log = logging.getLogger(__name__)


@dataclass
class ModelChoice:
    path: Path
    expected_sha256: str | None


def choose_model() -> ModelChoice:
    """``SORTLINE_MODEL`` if set, else the registry's active model, else the shipped one.

    Wherever the registry knows the file, its sha256 is checked on load.
    """
    from db.engine import session_scope
    from db.service import active_model, models_at_path
    from training.config import DEFAULT_CHECKPOINT

    s = get_worker_settings()
    expected = None
    try:
        with session_scope() as session:
            if s.model:
                path = Path(s.model).resolve()
                recs = models_at_path(session, path=str(path))
                expected = recs[0].sha256 if recs else None
            else:
                rec = active_model(session)
                if rec is not None and Path(rec.path).exists():
                    path, expected = Path(rec.path), rec.sha256
                else:
                    path = Path(DEFAULT_CHECKPOINT)
                    recs = models_at_path(session, path=str(path.resolve()))
                    expected = recs[0].sha256 if recs else None
    except Exception as e:  # no schema yet: fall back to the settings alone
        log.warning("model registry not readable (%s); using the configured checkpoint", e)
        path = Path(s.model) if s.model else Path(DEFAULT_CHECKPOINT)
    return ModelChoice(path=path, expected_sha256=expected)


def torch_threads(concurrency: int | None = None) -> int:
    """This process's share of the cores."""
    s = get_worker_settings()
    if s.torch_threads > 0:
        return s.torch_threads
    conc = concurrency or int(os.environ.get("SORTLINE_WORKER_CONCURRENCY", "1") or 1)
    return max(1, (os.cpu_count() or 1) // max(1, conc))


class Classifier:
    """A loaded checkpoint: preprocessing spec, class names, calibrated probabilities."""

    def __init__(
        self, path: str | Path, *, expected_sha256: str | None = None, device: str = "auto"
    ):
        import torch

        from training.checkpoint import load_checkpoint

        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(
                f"model checkpoint {self.path} does not exist; set SORTLINE_MODEL or run "
                "`sortline train` (see README)"
            )
        self.meta = read_metadata(self.path)
        self.sha256 = file_sha256(self.path)
        model, meta = load_checkpoint(self.path, expected_sha256=expected_sha256)
        self.classes: list[str] = list(meta["classes"])
        self.spec = PreprocessSpec.from_dict(meta["preprocess"])
        self.temperature = float(meta.get("temperature", 1.0))
        self.version = model_version(meta)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            log.warning("SORTLINE_DEVICE=cuda but no GPU is present; falling back to CPU")
            device = "cpu"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads())
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.half().to(memory_format=torch.channels_last)
        log.info("loaded %s (%s) on %s", self.version, self.path, self.device)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of preprocessed CHW arrays."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self.device.type == "cuda":
                x = x.half().to(memory_format=torch.channels_last)
            logits = self.model(x).float() / self.temperature
            return torch.softmax(logits, dim=1).cpu().numpy()


_lock = threading.Lock()
_classifier: Classifier | None = None


def get_classifier() -> Classifier:
    """This process's classifier, created on first use."""
    global _classifier
    with _lock:
        if _classifier is None:
            choice = choose_model()
            _classifier = Classifier(
                choice.path,
                expected_sha256=choice.expected_sha256,
                device=get_worker_settings().device,
            )
        return _classifier


def reset_classifier() -> None:
    """Forget the loaded model (tests, or after fork)."""
    global _classifier
    _classifier = None
