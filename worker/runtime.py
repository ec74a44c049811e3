"""The model in a worker process: loaded once on first use, after fork, never CUDA in the parent.

Two runtimes sit behind :class:`Classifier`: ONNX Runtime (the default on CPU, exported from
the checkpoint on first use into a cache) and PyTorch (CPU, or CUDA with fp16 and
channels_last). A :class:`MicroBatcher` gathers the images of concurrent tasks into one
forward pass.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sortline.errors import ConfigError
from training.model.calibration import calibrated
from training.model.checkpoint import (
    CheckpointError,
    model_version,
    preprocess_spec,
    read_metadata,
    verify_sha256,
)
from training.model.export import PRECISIONS, read_calibration, resolve_precision
from worker.config import get_worker_settings

log = logging.getLogger(__name__)


@dataclass
class ModelChoice:
    path: Path
    expected_sha256: str | None
    from_registry: bool = field(default=True, compare=False)  # False: the registry was unreadable


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
        return ModelChoice(path=path, expected_sha256=None, from_registry=False)
    return ModelChoice(path=path, expected_sha256=expected)


_worker_concurrency = 1  # processes of this worker; set in the parent before its pool forks


def set_worker_concurrency(n: int) -> None:
    """Record how many pool processes share the cores (called by the worker at start)."""
    global _worker_concurrency
    _worker_concurrency = max(1, n)


def torch_threads() -> int:
    """This process's share of the cores."""
    s = get_worker_settings()
    if s.torch_threads > 0:
        return s.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, _worker_concurrency))


class TorchBackend:
    """PyTorch on CPU, or on CUDA with fp16 and channels_last."""

    name = "torch"

    def __init__(self, path: Path, expected_sha256: str | None, device: str):
        import torch

        from training.model.scored import scored

        verify_sha256(path, expected_sha256)
        model, _ = scored(path)
        self.device = torch.device(resolve_device(device))
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads())
            model = model.to(memory_format=torch.channels_last)
        else:
            model = model.half().to(self.device).to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.precision = "fp32" if self.device.type == "cpu" else "fp16"

    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Logits, then the unfamiliarity scores if the checkpoint has its statistics."""
        import torch

        with torch.inference_mode():
            x = (
                torch.from_numpy(batch)
                .to(self.device)
                .contiguous(memory_format=torch.channels_last)
            )
            if self.device.type == "cuda":
                x = x.half()
            out = self.model(x)
            out = out if isinstance(out, tuple) else (out,)
            return [t.float().cpu().numpy() for t in out]


class OnnxBackend:
    """ONNX Runtime on CPU (fp32 or int8), from an export cached next to the other caches."""

    name = "onnx"
    device = "cpu"

    def __init__(self, path: Path, expected_sha256: str | None, precision: str = "fp32"):
        import onnxruntime as ort

        from training.config import get_training_settings

        verify_sha256(path, expected_sha256)
        self.precision = precision
        cache = get_training_settings().cache_dir / "onnx"
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / ".lock", "w") as lock:  # one export even with many processes
            fcntl.flock(lock, fcntl.LOCK_EX)
            onnx_path = _export_in_subprocess(path, cache, precision)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle intra-op threads would otherwise spin for work between forward passes, taking
        # the cores from decoding, the database driver and the broker: about twice the CPU time
        # per streamed image (bench/latency.py).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name

    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """Logits, then the unfamiliarity scores if the checkpoint has its statistics."""
        return self.session.run(None, {self.input: np.ascontiguousarray(batch)})


def _export_in_subprocess(path: Path, cache: Path, precision: str) -> Path:
    """The cached ONNX model of *path*, made by a child process so this one never imports torch.

    Keeping torch out of an ONNX Runtime worker saves about a gigabyte of resident memory.
    """
    out = subprocess.run(
        [sys.executable, "-m", "training.model.export", str(path), "--cache-dir", str(cache),
         "--precision", precision],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    if out.returncode != 0:
        raise CheckpointError(f"ONNX export of {path} failed: {out.stderr.strip()[-500:]}")
    return Path(out.stdout.strip().splitlines()[-1])


class Classifier:
    """A loaded checkpoint: preprocessing spec, class names, calibrated probabilities."""

    def __init__(
        self,
        path: str | Path,
        *,
        expected_sha256: str | None = None,
        device: str = "auto",
        runtime: str = "auto",
        precision: str = "auto",
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(
                f"model checkpoint {self.path} does not exist; set SORTLINE_MODEL or run "
                "`sortline train` (see README)"
            )
        meta = read_metadata(self.path)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.spec = preprocess_spec(meta)
        self.version = model_version(meta)
        if runtime not in ("auto", "onnx", "torch"):
            raise ConfigError(f"SORTLINE_RUNTIME must be auto, onnx or torch, not {runtime!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"SORTLINE_PRECISION must be auto, fp32 or int8, not {precision!r}")
        device = resolve_device(device)
        if runtime == "auto":
            runtime = "torch" if device == "cuda" else "onnx"
        self.backend: OnnxBackend | TorchBackend
        if runtime == "onnx":
            precision = resolve_precision(self.path, precision)
            self.backend = OnnxBackend(self.path, expected_sha256, precision)
        elif precision == "int8":
            raise ConfigError(
                "SORTLINE_PRECISION=int8 runs on ONNX Runtime only; set SORTLINE_RUNTIME=onnx "
                "(or auto on a CPU), or SORTLINE_PRECISION=auto"
            )
        else:
            self.backend = TorchBackend(self.path, expected_sha256, device)
        self.batcher: MicroBatcher | None = None  # made by get_batcher on first use
        self.runtime = self.backend.name
        self.precision = self.backend.precision
        override = get_worker_settings().unfamiliar_threshold
        fitted = (meta.get("unfamiliarity") or {}).get("threshold")
        if self.precision == "int8":  # refitted on the int8 model's own val scores
            fitted = (read_calibration(self.path) or {}).get("unfamiliar_threshold", fitted)
        self.unfamiliar_threshold: float | None = override if override is not None else fitted
        log.info("loaded %s (%s) with %s %s", self.version, self.path, self.runtime, self.precision)

    def close(self) -> None:
        """Let this model go once the tasks using it are done (its batcher thread ends)."""
        if self.batcher is not None:
            self.batcher.close()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, then one more column: the unfamiliarity score.

        The score is NaN for a checkpoint without unfamiliarity statistics.
        """
        out = self.backend.outputs(batch)
        score = out[1] if len(out) > 1 else np.full(len(out[0]), np.nan)
        probs = calibrated(out[0], score if len(out) > 1 else None, self.meta)
        return np.concatenate([probs, score[:, None]], axis=1).astype(np.float32)


def served_classifier(checkpoint: str | Path, *, runtime: str, precision: str) -> Classifier:
    """The classifier a CPU worker with these settings would run, in this process."""
    return Classifier(checkpoint, device="cpu", runtime=runtime, precision=precision)


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for a requested ``auto``, ``cpu`` or ``cuda``.

    ``auto`` looks for an NVIDIA driver first, so a CPU host never imports torch here.
    A requested GPU that is not there falls back to the CPU with a warning. Called in the
    worker's child process, on first use: CUDA is never initialised in the parent.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"SORTLINE_DEVICE must be auto, cpu or cuda, not {device!r}")
    if device == "cpu" or (device == "auto" and not os.path.exists("/proc/driver/nvidia/version")):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        log.warning("SORTLINE_DEVICE=cuda but no GPU is present; falling back to the CPU")
    return "cpu"


class MicroBatcher:
    """Gather the arrays of concurrent callers into one forward pass.

    A batch is run when it holds ``max_batch`` images, when no task of this process is still
    preparing images it will hand in (a task counts from entering the batcher to its first
    call, so one already served is not waited for), or ``max_wait`` seconds after its first
    image, so a lone caller never waits. A call larger than ``max_batch`` runs alone, in chunks.
    """

    def __init__(self, predict, *, max_batch: int, max_wait: float, on_batch=None):
        self._predict = predict
        self._on_batch = on_batch  # (images, seconds waited) per caller, forward seconds
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait)
        self._cv = threading.Condition()
        self._pending: list[tuple[np.ndarray, Future, float]] = []
        self._active = 0  # tasks inside ``with``
        self._coming = 0  # ... of which have not handed in their images yet
        self._local = threading.local()
        self._closed = False
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="sortline-batcher", daemon=True)
        self._thread.start()

    def __enter__(self) -> MicroBatcher:
        with self._cv:
            self._active += 1
            self._coming += 1
        self._local.coming = True
        return self

    def __exit__(self, *exc) -> None:
        with self._cv:
            self._active -= 1
            self._handed_in()
            self._cv.notify_all()

    def _handed_in(self) -> None:
        """This thread's task will hand in nothing more that a batch should wait for."""
        if getattr(self._local, "coming", False):
            self._local.coming = False
            self._coming -= 1

    def close(self) -> None:
        """Stop the batching thread once no task uses this batcher any more."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def predict(self, arrays: np.ndarray) -> np.ndarray:
        """Probabilities for *arrays*, computed in a shared batch."""
        fut: Future = Future()
        with self._cv:
            if self._closed and not self._thread.is_alive():  # a task that raced a model switch
                return self._predict(arrays)
            self._pending.append((arrays, fut, time.monotonic()))
            self._handed_in()
            self._cv.notify_all()
        return fut.result()

    def _ready(self) -> bool:
        n = sum(len(a) for a, _, _ in self._pending)
        return (
            n >= self.max_batch
            or self._coming <= 0
            or time.monotonic() - self._pending[0][2] >= self.max_wait
        )

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    if self._closed and self._active == 0:
                        return
                    self._cv.wait()
                while not self._ready():
                    self._cv.wait(
                        timeout=max(0.0005, self._pending[0][2] + self.max_wait - time.monotonic())
                    )
                take: list[tuple[np.ndarray, Future, float]] = []
                n = 0
                while self._pending and (
                    not take or n + len(self._pending[0][0]) <= self.max_batch
                ):
                    item = self._pending.pop(0)
                    take.append(item)
                    n += len(item[0])
            self._run(take)

    def _run(self, take) -> None:
        started = time.monotonic()
        try:
            batch = np.concatenate([a for a, _, _ in take]) if len(take) > 1 else take[0][0]
            out = np.concatenate(
                [
                    self._predict(batch[i : i + self.max_batch])
                    for i in range(0, len(batch), self.max_batch)
                ]
            )
            self.batch_sizes.append(len(batch))
            del self.batch_sizes[:-1000]
            forward = time.monotonic() - started
        except BaseException as e:  # hand the error to every caller of this batch
            for _, fut, _ in take:
                fut.set_exception(e)
            return
        i = 0
        for a, fut, _ in take:
            fut.set_result(out[i : i + len(a)])
            i += len(a)
        if self._on_batch is not None:
            self._on_batch([(len(a), started - t) for a, _, t in take], forward)


_lock = threading.Lock()
_classifier: Classifier | None = None
_choice: ModelChoice | None = None
_checked_at = 0.0


def get_classifier() -> Classifier:
    """This process's classifier: loaded on first use, and again once the model chosen changes.

    The registry is asked at most every ``SORTLINE_MODEL_CHECK_INTERVAL`` seconds (before a
    task), so a newly activated model is picked up without a restart and loaded once per
    process; tasks already running finish with the model they started with.
    """
    global _classifier, _choice, _checked_at
    s = get_worker_settings()
    with _lock:
        now = time.monotonic()
        if _classifier is not None and now - _checked_at < s.model_check_interval:
            return _classifier
        _checked_at = now
        choice = choose_model()
        if _classifier is not None and not choice.from_registry:
            return _classifier  # a database hiccup is no reason to switch models
        if _classifier is None or choice != _choice:
            old = _classifier
            _classifier = Classifier(
                choice.path,
                expected_sha256=choice.expected_sha256,
                device=s.device,
                runtime=s.runtime,
                precision=s.precision,
            )
            _choice = choice
            if old is not None:
                log.info("switched from %s to %s", old.version, _classifier.version)
                old.close()
        return _classifier


def _record_batch(waits: list[tuple[int, float]], forward: float) -> None:
    """Prometheus: each image's wait for its forward pass, and that pass's time."""
    from worker.metrics import record_stage

    for images, waited in waits:
        record_stage("batch_wait", waited, images)
        record_stage("forward", forward, images)


def get_batcher(clf: Classifier | None = None) -> MicroBatcher:
    """The micro-batcher around *clf* (default: this process's classifier)."""
    clf = clf or get_classifier()
    with _lock:
        if clf.batcher is None:
            s = get_worker_settings()
            clf.batcher = MicroBatcher(
                clf.predict,
                max_batch=s.max_batch,
                max_wait=s.max_wait_ms / 1000,
                on_batch=_record_batch,
            )
        return clf.batcher
