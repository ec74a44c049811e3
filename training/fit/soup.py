"""A model soup: the weights of fine-tuned runs averaged, and chosen against its members on val.

Runs fine-tuned from the same pretrained weights (same architecture, same split) can be
averaged into one network that costs no more to run than each of them (Wortsman et al., 2022,
"Model soups"). Each member and the uniform soup are scored on the val split with the score
that picks the WiSE-FT weight (mean of clean val macro-F1 and val macro-F1 under a few
corruptions); the test split plays no part. The soup is written as a run folder that
``sortline ship`` takes like any other.

Run: ``sortline soup runs/ft-C runs/ft-D --out runs/soup-CD``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sortline.errors import SortlineError
from training.data.dataset import load_resized, read_manifest
from training.fit.train import SELECTION_CORRUPTIONS, selection_score
from training.model.checkpoint import load_checkpoint, preprocess_spec, save_checkpoint

log = logging.getLogger(__name__)


class SoupError(SortlineError, ValueError):
    """Runs that cannot be averaged; the message says why."""


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of floating tensors; other tensors (counters) from the first state."""
    if not states:
        raise SoupError("no states to average")
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise SoupError("the runs' networks differ (keys or shapes)")
    return {
        k: torch.stack([s[k] for s in states]).mean(0)
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in keys
    }


def make_soup(runs: Sequence[str | Path], out: str | Path, *, cache_dir: str = "cache") -> dict:
    """Average *runs* into ``out``; score members and soup on val; return the table and choice."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise SoupError("a soup needs at least two runs")
    loaded = [load_checkpoint(r / "model.safetensors") for r in runs]
    metas = [m for _, m in loaded]
    for r, m in zip(runs[1:], metas[1:], strict=True):
        for key in ("arch", "classes", "preprocess", "manifest_sha256"):
            if m[key] != metas[0][key]:
                raise SoupError(f"{r} differs from {runs[0]} in {key}; only like runs average")
    info = json.loads((runs[0] / "manifest.json").read_text())
    ds = read_manifest(runs[0] / "manifest.csv", info["root"])
    spec = preprocess_spec(metas[0])
    classes = metas[0]["classes"]
    samples = ds.split("val")
    y = np.array([classes.index(s.label) for s in samples])
    images = load_resized(ds, samples, short_side=spec.resize, cache_dir=Path(cache_dir))

    table = {}
    for r, (model, _) in zip(runs, loaded, strict=True):
        table[r.name] = selection_score(model, images, y, spec)
        log.info("%s on val: %s", r.name, table[r.name])
    soup = copy.deepcopy(loaded[0][0])
    soup.load_state_dict(average_states([m.state_dict() for m, _ in loaded]))
    table["soup"] = selection_score(soup, images, y, spec)
    log.info("soup on val: %s", table["soup"])
    choice = max(table, key=lambda k: table[k]["score"])

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("manifest.csv", "manifest.json"):
        shutil.copyfile(runs[0] / f, out / f)
    selection = {"split": "val", "corruptions": list(SELECTION_CORRUPTIONS), "table": table}
    meta = {
        **metas[0],
        "version": "soup",
        "metrics": {"soup_selection": selection},
        "training": {
            "soup_of": [
                {"run": r.name, "training": m["training"]} for r, m in zip(runs, metas, strict=True)
            ],
        },
    }
    save_checkpoint(out / "model.safetensors", soup, meta)
    result = {**selection, "choice": choice}
    (out / "soup.json").write_text(json.dumps(result, indent=1))
    return result
