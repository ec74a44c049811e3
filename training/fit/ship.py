"""Turn a run's checkpoint into the shipped model: float16 weights, name, version, fresh figures.

The float16 copy is scored again on the run's own val and test splits (rebuilt from its
manifest), so the figures stored with the shipped file are the shipped file's. The temperature
is refitted on val, and the unfamiliarity statistics on the train split's features.
Run: ``sortline ship runs/RUN --version 1.0.0``; a checkpoint file instead of a run folder is
re-shipped (new calibration and unfamiliarity statistics, same weights) on its own split, rebuilt
from the dataset it records or ``--data``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from training.config import DEFAULT_CHECKPOINT
from training.data.dataset import checkpoint_split, load_resized, read_manifest
from training.fit import evaluate as ev
from training.model.checkpoint import file_sha256, load_checkpoint, preprocess_spec, save_checkpoint

log = logging.getLogger(__name__)


def ship(
    source: str | Path,
    *,
    version: str,
    data: str | Path | None = None,
    out: str | Path = DEFAULT_CHECKPOINT,
    name: str = "sortline-trashnet",
    cache_dir: str = "cache",
    robustness: bool = True,
) -> dict:
    """Write the float16 checkpoint of *source* (a run folder or a checkpoint) to *out*,
    re-scored; return its metrics."""
    source, out = Path(source), Path(out)
    ckpt = source / "model.safetensors" if source.is_dir() else source
    if source.is_dir():
        model, meta = load_checkpoint(ckpt)
        info = json.loads((source / "manifest.json").read_text())
        ds = read_manifest(source / "manifest.csv", info["root"])
        origin = {"source_run": source.name}
    else:
        model, meta = load_checkpoint(source)
        ds = checkpoint_split(meta, data)
        origin = {"reshipped_from": f"{meta.get('name')}:{meta.get('version')}"}
    if meta.get("refit"):
        return _ship_refit(model, meta, ckpt, ds, out, name=name, version=version,
                           cache_dir=cache_dir, origin=origin)  # fmt: skip
    tmp = out.with_suffix(".tmp.safetensors")
    save_checkpoint(tmp, model, meta, half=True)
    model, _ = load_checkpoint(tmp)  # the float16 weights, back as float32
    spec = preprocess_spec(meta)
    classes = meta["classes"]
    images, y = {}, {}
    for sp in ("train", "val", "test"):
        samples = ds.split(sp)
        y[sp] = np.array([classes.index(s.label) for s in samples])
        images[sp] = load_resized(ds, samples, short_side=spec.resize, cache_dir=Path(cache_dir))
    scored = ev.score_splits(model, images, y, spec, classes, robustness=robustness)
    for sp in ("val", "test"):
        scored[sp].pop("confusion", None)
    metrics = {**meta["metrics"], **scored}
    if not robustness and "test_robustness" in metrics:
        metrics["test_robustness"] = {
            **metrics["test_robustness"],
            "weights": "float32 (the run's)",
        }
    cal = scored["calibration"]
    from training.fit.run import fit_unfamiliarity

    stats, meta["unfamiliarity"] = fit_unfamiliarity(model, images, y, spec, cal["temperature"])
    meta = {
        **meta,
        "name": name,
        "version": version,
        "temperature": cal["temperature"],
        "metrics": metrics,
        **origin,
    }
    save_checkpoint(tmp, model, meta, half=True, unfamiliarity=stats)
    return _written(tmp, out, source, metrics)


def _written(tmp: Path, out: Path, source: Path, metrics: dict) -> dict:
    os.replace(tmp, out)
    out.chmod(0o644)
    sha = file_sha256(out)
    log.info("shipped %s (%s) -> %s", source, sha[:12], out)
    return {"path": str(out), "sha256": sha, "bytes": out.stat().st_size, "metrics": metrics}


def _ship_refit(
    model, meta: dict, ckpt: Path, ds, out: Path, *, name: str, version: str, cache_dir: str,
    origin: dict,
) -> dict:  # fmt: skip
    """A refit on all the data (``sortline refit``) saw every photo of its split: nothing is
    re-scored or recalibrated; the float16 file keeps the run's figures, temperature and
    unfamiliarity statistics, and its labels on the test split are compared with the float32
    weights' (``half_parity``: how many differ)."""
    from training.model.checkpoint import read_unfamiliarity

    tmp = out.with_suffix(".tmp.safetensors")
    spec = preprocess_spec(meta)
    samples = ds.split("test")
    images = load_resized(ds, samples, short_side=spec.resize, cache_dir=Path(cache_dir))
    before = ev.predict_logits(model, images, spec).argmax(1)
    meta = {**meta, "name": name, "version": version, **origin}
    stats = read_unfamiliarity(ckpt)
    save_checkpoint(tmp, model, meta, half=True, unfamiliarity=stats)
    half, _ = load_checkpoint(tmp)
    differ = int((ev.predict_logits(half, images, spec).argmax(1) != before).sum())
    meta["half_parity"] = {"split": "test", "n": len(samples), "labels_differ": differ}
    save_checkpoint(tmp, model, meta, half=True, unfamiliarity=stats)
    log.info("float16 refit: %d of %d test labels differ from float32", differ, len(samples))
    return {**_written(tmp, out, ckpt, meta["metrics"]), "half_parity": meta["half_parity"]}
