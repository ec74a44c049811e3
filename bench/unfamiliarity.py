"""Unfamiliarity scores compared on the development data: which one separates shifted photos.

Features of a checkpoint on TrashNet's train/val/test split and on the test split changed by
the robustness corruptions (the "new site" proxy); each score's threshold flags 5% of val (--val-flagged).
Prints, per score: share of clean test and shifted test flagged, AUROC clean-vs-shifted, and
the confident-error rate (wrong and not flagged, flagged = confidence below the review
threshold or unfamiliar) and ECE on clean and shifted test; the first row is confidence alone
(1.1.0, shipped without statistics), the last rows the checkpoint's own score (with and without
its shift temperature). The shifts are kept apart from ``SHIFT_FIT``, what the checkpoint's
shift detector and temperature were fitted on (train and val photos).

    python bench/unfamiliarity.py --data /work/shared/trashnet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SHIFTS = ("scene", "zoom_out_0.6", "crop_0.6", "dark", "background_wood")


def features_of(checkpoint: Path, data: Path, cache: Path) -> dict[str, np.ndarray]:
    """Pooled features and logits of every split and every shift (cached)."""
    from training.data.dataset import load_resized, load_split, manifest_sha256
    from training.data.features import cached_features, extract, split_features
    from training.fit.robustness import corrupt
    from training.model.checkpoint import file_sha256, load_checkpoint, preprocess_spec
    from training.model.factory import head_module

    model, meta = load_checkpoint(checkpoint)
    model = model.to(memory_format=torch.channels_last).eval()
    spec = preprocess_spec(meta)
    ds = load_split(data, seed=0)
    sha = file_sha256(checkpoint)
    feats = split_features(model, sha, meta["arch"], spec, ds, cache)
    key = {"arch": meta["arch"], "checkpoint": sha, "manifest_sha256": manifest_sha256(ds),
           "shifts": list(SHIFTS), "test_only": True}  # fmt: skip

    def compute() -> dict[str, np.ndarray]:
        test = load_resized(ds, ds.split("test"), short_side=spec.resize, cache_dir=cache)
        out = {}
        for name in SHIFTS:
            pil = corrupt(test, name)
            out[f"{name}_x"] = extract(model, [np.asarray(p.convert("RGB")) for p in pil], spec)
        return out

    feats = {**feats, **cached_features(key, compute, cache)}
    head = head_module(model).float()
    with torch.no_grad():
        logits = {k[:-2]: head(torch.from_numpy(v)).numpy()
                  for k, v in feats.items() if k.endswith("_x")}  # fmt: skip
    return {"feats": feats, "logits": logits, "meta": meta}


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    s = np.concatenate([neg, pos])
    r = s.argsort().argsort() + 1
    return float((r[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/work/shared/trashnet"))
    ap.add_argument("--checkpoint", type=Path, default=Path("models/sortline-trashnet.safetensors"))
    ap.add_argument("--cache", type=Path, default=Path("cache"))
    ap.add_argument("--review-threshold", type=float, default=0.6)
    ap.add_argument("--val-flagged", type=float, default=0.05, help="Share of val above it.")
    a = ap.parse_args()
    from training.model import unfamiliarity
    from training.model.calibration import calibrated, expected_calibration_error, softmax
    from training.model.checkpoint import read_unfamiliarity

    torch.set_num_threads(2)
    t0 = time.time()
    r = features_of(a.checkpoint, a.data, a.cache)
    f, lg, meta = r["feats"], r["logits"], r["meta"]
    t = float(meta["temperature"])
    print(f"features ready in {time.time() - t0:.0f} s")
    y = f["test_y"]
    shifted_x = np.concatenate([f[f"{s}_x"] for s in SHIFTS])
    shifted_lg = np.concatenate([lg[s] for s in SHIFTS])
    shifted_y = np.tile(y, len(SHIFTS))
    review = a.review_threshold

    def row(name: str, thr: float, fn, probs=None) -> dict:
        """Flags and errors of one score (*fn*: features, logits -> score; above *thr*
        unfamiliar), with probabilities by *probs* (score, logits) or the plain temperature."""
        out: dict = {"score": name}
        for split, x, z, yy in (("clean_test", f["test_x"], lg["test"], y),
                                ("shifted", shifted_x, shifted_lg, shifted_y)):  # fmt: skip
            s = fn(x, z)
            p = probs(s, z) if probs else softmax(z, t)
            flagged = (p.max(1) < review) | (s > thr)
            out[f"{split}_unfamiliar"] = round(float((s > thr).mean()), 4)
            out[f"{split}_flagged"] = round(float(flagged.mean()), 4)
            out[f"{split}_confident_error_rate"] = round(
                float(((p.argmax(1) != yy) & ~flagged).mean()), 4
            )
            out[f"{split}_ece"] = round(expected_calibration_error(p, yy), 4)
        out["auroc_clean_vs_shifted"] = round(auroc(fn(f["test_x"], lg["test"]),
                                                    fn(shifted_x, shifted_lg)), 4)  # fmt: skip
        return out

    def quantile_row(name: str, fn) -> dict:
        return row(name, float(np.quantile(fn(f["val_x"], lg["val"]), 1 - a.val_flagged)), fn)

    stats, _ = unfamiliarity.fit(f["train_x"], f["train_y"], f["val_x"], flagged=a.val_flagged)
    train_n = f["train_x"] / np.linalg.norm(f["train_x"], axis=1, keepdims=True)

    def knn(x: np.ndarray, k: int = 10) -> np.ndarray:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        return -np.sort(xn @ train_n.T, axis=1)[:, -k]

    def energy(logits: np.ndarray) -> np.ndarray:
        m = logits.max(1)
        return -(m + np.log(np.exp(logits - m[:, None]).sum(1)))

    rows = [
        row("confidence only (1.1.0: no statistics)", np.inf, lambda x, z: np.zeros(len(x))),
        quantile_row("mahalanobis", lambda x, z: unfamiliarity.score(x, stats)),
        quantile_row("knn10_cosine", lambda x, z: knn(x)),
        quantile_row("energy", lambda x, z: energy(z)),
        quantile_row("max_softmax", lambda x, z: -softmax(z, t).max(1)),
    ]
    own = read_unfamiliarity(a.checkpoint)
    info = meta.get("unfamiliarity") or {}
    if own is not None:

        def own_score(x, z):
            return unfamiliarity.score(x, own)

        rows.append(row(f"checkpoint's own: {info.get('method')}, shift temperature slope "
                        f"{info.get('shift_slope', 0):.3f}", float(info["threshold"]), own_score,
                        lambda s, z: calibrated(z, s, meta)))  # fmt: skip
        rows.append(row(f"checkpoint's own: {info.get('method')}, plain temperature",
                        float(info["threshold"]), own_score))  # fmt: skip
    base = rows[0]["shifted_confident_error_rate"]
    p = softmax(shifted_lg, t)
    print(json.dumps({"checkpoint": f"{meta.get('name')}:{meta.get('version')}",
                      "shifted_accuracy": round(float((p.argmax(1) == shifted_y).mean()), 4),
                      "n_clean_test": len(y), "n_shifted": len(shifted_y)}))  # fmt: skip
    for r_ in rows:
        r_["shifted_cer_change"] = round(r_["shifted_confident_error_rate"] / base - 1, 3)
        print(json.dumps(r_))


if __name__ == "__main__":
    main()
