"""`sortline adapt` on a "new site" proxy: does it learn a site's photos without forgetting?

The proxy: the internal test split (never trained on) photographed as at one site
(``training.fit.robustness`` "site": small object on a tiled floor, cold fluorescent light,
dim, soft focus, strong JPEG), split in two seeded halves. The reviewed half is written as an
ImageFolder (PNG, lossless) and given to the same code as `sortline adapt`; accuracy is then
measured on the unseen half (site photos of other objects) and on the clean test split, for
the base model (its cached features) and for the adapted checkpoint (fresh forward passes).
One line per seed of the halves, then a summary over the seeds: with 161 unseen photos one
split moves the gain by several points (seed 0 alone said +9.3, ten others +2.4 on average).

``--oracle`` also prints what the frozen backbone allows at all: the base head refitted on the
1503 training photos twice, clean and under the same site corruption (correct labels, ten
times the reviewed photos); its gain on each unseen half bounds any head-only adaptation.

    python bench/adapt.py --data /work/shared/trashnet --seeds 0-9 [--mode finetune|head]
        [--steps N] [--oracle] [--val-site] [--checkpoint BASE]

``--val-site`` also scores the val split (324 photos of other objects, which adapt never
trains on) under the same corruption, and as it is (``clean_val_change_points``): twice the
photos of an unseen half, and a clean figure beside the clean test, for choosing settings
without spending the halves.

The base must not have seen the test split: the shipped 1.3.0 is an all-data refit, so the
figures are taken with 1.2.0 (``git show 3201ce6:models/sortline-trashnet.safetensors``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/work/shared/trashnet"))
    ap.add_argument("--checkpoint", type=Path, default=Path("models/sortline-trashnet.safetensors"))
    ap.add_argument("--cache", type=Path, default=Path("cache"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-adapt"))
    ap.add_argument("--site", default="site", help="Corruption of training.fit.robustness.")
    ap.add_argument(
        "--seeds", default="0-9", help="Seeds of the reviewed/unseen halves: 0-9 or 0,3."
    )
    ap.add_argument("--mode", default="finetune", help="adapt mode: finetune or head")
    ap.add_argument("--steps", type=int, default=None, help="finetune steps [adapt's default]")
    ap.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another AdaptParams setting, e.g. --param lr=1e-4 --param site_look=1 (repeatable)",
    )
    ap.add_argument(
        "--oracle-look",
        action="store_true",
        help="finetune: replay in the proxy's own corruption instead of the look estimated "
        "from the reviewed photos (what a perfect estimate of the site's look would give)",
    )
    ap.add_argument(
        "--wise",
        default=None,
        help="finetune: also score these WiSE-FT blends (e.g. 0.5,0.8,1, or 1:0.5 graded from "
        "the stem to the head): the fine-tune runs once unblended, each blend is scored on the "
        "unseen half and the clean test",
    )
    ap.add_argument(
        "--oracle",
        action="store_true",
        help="Also a head fitted on site-corrupted training photos.",
    )
    ap.add_argument(
        "--val-site",
        action="store_true",
        help="Also score the val split under the same corruption (324 more site photos of objects "
        "neither half shows; adapt never trains on val, it fits only the temperature and the "
        "unfamiliarity threshold there): a less noisy figure for choosing settings, so that the "
        "unseen halves stay for the report",
    )
    a = ap.parse_args()
    from training.data.dataset import load_resized, load_split
    from training.data.features import split_features
    from training.fit.robustness import corrupt
    from training.model.checkpoint import file_sha256, load_checkpoint, preprocess_spec

    torch.set_num_threads(2)
    base, meta = load_checkpoint(a.checkpoint)
    if "refit" in meta:
        raise SystemExit(
            f"{a.checkpoint} is an all-data refit: it trained on the test split this proxy is "
            "made of; pass --checkpoint of a model trained on the train split (e.g. 1.2.0: git "
            "show 3201ce6:models/sortline-trashnet.safetensors > base-1.2.0.safetensors)"
        )
    base = base.to(memory_format=torch.channels_last).eval()
    spec = preprocess_spec(meta)
    ds = load_split(a.data, seed=int(meta["training"]["split_seed"]))
    t0 = time.time()
    feats = split_features(base, file_sha256(a.checkpoint), meta["arch"], spec, ds, a.cache)
    test = ds.split("test")
    site = corrupt(load_resized(ds, test, short_side=spec.resize, cache_dir=a.cache), a.site)
    site = [np.asarray(p.convert("RGB")) for p in site]
    y = feats["test_y"]
    if a.oracle:
        feats["oracle_head"] = oracle_head(base, ds, spec, feats, a)
    if a.val_site:
        from training.data.features import extract

        val = load_resized(ds, ds.split("val"), short_side=spec.resize, cache_dir=a.cache)
        feats["val_clean"] = val  # as it is: the clean figure for choosing
        feats["val_site"] = [np.asarray(p.convert("RGB")) for p in corrupt(val, a.site)]
        feats["val_site_x"] = extract(base, feats["val_site"], spec)
    print(f"proxy ready in {time.time() - t0:.0f} s")
    rows = [one_split(a, seed, base, meta, ds, feats, site, y) for seed in seeds(a.seeds)]
    gain = [r["unseen_gain_points"] for r in rows]
    clean = [r["clean_test_change_points"] for r in rows]
    print(json.dumps({
        "seeds": len(rows), "unseen_gain_points_mean": round(float(np.mean(gain)), 2),
        "unseen_gain_points_min": min(gain), "unseen_gain_points_max": max(gain),
        "clean_test_change_points_mean": round(float(np.mean(clean)), 2),
        "clean_test_change_points_min": min(clean),
        "adapt_seconds_mean": round(float(np.mean([r["adapt_seconds"] for r in rows])), 1),
        **({"val_site_gain_points_mean": round(float(np.mean(
            [r["val_site_gain_points"] for r in rows])), 2),
            "clean_val_change_points_mean": round(float(np.mean(
            [r["clean_val_change_points"] for r in rows])), 2)} if a.val_site else {}),
        **({"oracle_gain_points_mean": round(float(np.mean([r["oracle_gain_points"] for r in rows])), 2),
            "oracle_clean_test_change_points_mean": round(float(np.mean(
                [r["oracle_clean_test_change_points"] for r in rows])), 2)} if a.oracle else {}),
    }))  # fmt: skip
    if a.wise:
        for w in rows[0]["wise"]:
            g = [r["wise"][w]["unseen_gain_points"] for r in rows]
            c = [r["wise"][w]["clean_test_change_points"] for r in rows]
            v = {"val_site_gain_points_mean": round(float(np.mean(
                [r["wise"][w]["val_site_gain_points"] for r in rows])), 2)} if a.val_site else {}  # fmt: skip
            print(json.dumps({"wise": w, "unseen_gain_points_mean": round(float(np.mean(g)), 2),
                              **v,
                              "unseen_gain_points_min": min(g),
                              "clean_test_change_points_mean": round(float(np.mean(c)), 2),
                              "clean_test_change_points_min": min(c)}))  # fmt: skip


def oracle_head(base, ds, spec, feats, a) -> torch.nn.Module:
    """The base head refitted (as ``adapt`` does) on the training split clean and under the
    site corruption (another seed than the test photos'): what knowing the site fully buys."""
    from training.data.dataset import load_resized
    from training.data.features import extract
    from training.fit.adapt import AdaptParams, fit_head
    from training.fit.robustness import corrupt
    from training.fit.run import last_linear
    from training.model.factory import head_module

    imgs = load_resized(ds, ds.split("train"), short_side=spec.resize, cache_dir=a.cache)
    site = [np.asarray(p.convert("RGB")) for p in corrupt(imgs, a.site, seed=1)]
    x = np.concatenate([feats["train_x"], extract(base, site, spec)])
    y = np.concatenate([feats["train_y"], feats["train_y"]])
    model = copy.deepcopy(base)
    lin = last_linear(model)
    w, b = fit_head(lin.weight.detach().numpy(), lin.bias.detach().numpy(), x, y,
                    np.ones(len(y)), AdaptParams())  # fmt: skip
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    return head_module(model).float()


def params_set(items: list[str]) -> dict:
    """``NAME=VALUE`` pairs as AdaptParams keyword arguments, typed as the fields' defaults."""
    from training.fit.adapt import AdaptParams

    defaults, out = AdaptParams(), {}
    for item in items:
        name, _, value = item.partition("=")
        if not hasattr(defaults, name):
            raise SystemExit(f"--param {item}: AdaptParams has no setting {name!r}")
        out[name] = (
            type(getattr(defaults, name))(value)
            if getattr(defaults, name) is not None
            else int(value)
        )
    return out


def seeds(spec: str) -> list[int]:
    if "-" in spec:
        lo, hi = spec.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in spec.split(",")]


def one_split(a, seed: int, base, meta, ds, feats, site, y) -> dict:
    """Adapt on one seeded reviewed half; figures on the unseen half and the clean test."""
    from training.data.dataset import load_resized
    from training.data.features import extract
    from training.fit.adapt import AdaptParams, adapt
    from training.model.checkpoint import load_checkpoint, preprocess_spec
    from training.model.factory import head_module

    spec, classes = preprocess_spec(meta), meta["classes"]
    test = ds.split("test")
    perm = np.random.default_rng(seed).permutation(len(test))
    reviewed, unseen = perm[: len(test) // 2], perm[len(test) // 2 :]
    folder = a.out / "reviewed"
    shutil.rmtree(folder, ignore_errors=True)
    for i in reviewed:
        (folder / classes[y[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(site[i]).save(folder / classes[y[i]] / f"{i:04d}.png")

    t1 = time.time()
    params = AdaptParams(mode=a.mode, **({"steps": a.steps} if a.steps else {}),
                         **params_set(a.param), **({"wise": 1.0} if a.wise else {}))  # fmt: skip
    look = None
    if a.oracle_look:
        from training.fit.robustness import SITES

        def look(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return np.asarray(SITES[a.site](Image.fromarray(img), rng).convert("RGB"))

    summary = adapt(folder, a.checkpoint, a.out / "model", data=a.data, cache_dir=a.cache,
                    params=params, register=False, look=look,
                    progress=lambda line: print(f"seed {seed}: {line}", file=sys.stderr,
                                                flush=True))  # fmt: skip
    adapt_s = time.time() - t1
    model, _ = load_checkpoint(summary["checkpoint"])
    model = model.to(memory_format=torch.channels_last).eval()
    head = head_module(model).float()
    base_head = head_module(base).float()

    def acc(h: torch.nn.Module, x: np.ndarray, labels: np.ndarray) -> float:
        with torch.no_grad():
            return float((h(torch.from_numpy(x)).argmax(1).numpy() == labels).mean())

    site_base = extract(base, [site[i] for i in unseen], spec)  # the base model's features
    site_new = extract(model, [site[i] for i in unseen], spec)
    clean_new = extract(
        model, load_resized(ds, test, short_side=spec.resize, cache_dir=a.cache), spec
    )
    row = {
        "seed": seed,
        "base": summary["base"],
        "adapted": summary["model"],
        "mode": a.mode,
        "reviewed": len(reviewed),
        "replay": summary["replay"],
        "adapt_seconds": round(adapt_s, 1),
        "steps_run": summary.get("steps"),
        "unseen_site_accuracy_base": round(acc(base_head, site_base, y[unseen]), 4),
        "unseen_site_accuracy_adapted": round(acc(head, site_new, y[unseen]), 4),
        "clean_test_accuracy_base": round(acc(base_head, feats["test_x"], y), 4),
        "clean_test_accuracy_adapted": round(acc(head, clean_new, y), 4),
        "clean_val_accuracy_adapted": summary["val_accuracy"],
    }
    row["unseen_gain_points"] = round(
        100 * (row["unseen_site_accuracy_adapted"] - row["unseen_site_accuracy_base"]), 1
    )
    row["clean_test_change_points"] = round(
        100 * (row["clean_test_accuracy_adapted"] - row["clean_test_accuracy_base"]), 1
    )
    if "val_site" in feats:  # the val split under the site corruption, never trained on
        val_y = feats["val_y"]
        # and as it is: the clean figure for choosing (the clean test stays for the report)
        val_clean = feats["val_clean"]
        row["clean_val_accuracy_base"] = round(acc(base_head, feats["val_x"], val_y), 4)
        row["clean_val_change_points"] = round(100 * (acc(head, extract(
            model, val_clean, spec), val_y) - row["clean_val_accuracy_base"]), 1)  # fmt: skip
        row["val_site_accuracy_base"] = round(acc(base_head, feats["val_site_x"], val_y), 4)
        row["val_site_gain_points"] = round(100 * (acc(head, extract(
            model, feats["val_site"], spec), val_y) - row["val_site_accuracy_base"]), 1)  # fmt: skip
    if a.wise:  # the blends of the unblended fine-tune with the base, each scored
        from training.fit.train import wise_blend

        tuned = {k: v.clone() for k, v in model.state_dict().items()}
        row["wise"] = {}
        for w in a.wise.split(","):  # 0.5, or 1:0.5 (graded from the stem to the head)
            alpha = tuple(float(x) for x in w.split(":")) if ":" in w else float(w)
            model.load_state_dict(wise_blend(base.state_dict(), tuned, alpha))
            h = head_module(model).float()
            un = acc(h, extract(model, [site[i] for i in unseen], spec), y[unseen])
            cl = acc(h, extract(model, load_resized(ds, test, short_side=spec.resize,
                                                    cache_dir=a.cache), spec), y)  # fmt: skip
            row["wise"][w] = {
                "unseen_gain_points": round(100 * (un - row["unseen_site_accuracy_base"]), 1),
                "clean_test_change_points": round(100 * (cl - row["clean_test_accuracy_base"]), 1),
            }
            if "val_site" in feats:
                vs = acc(h, extract(model, feats["val_site"], spec), val_y)
                row["wise"][w]["val_site_gain_points"] = round(
                    100 * (vs - row["val_site_accuracy_base"]), 1
                )
                vc = acc(h, extract(model, val_clean, spec), val_y)
                row["wise"][w]["clean_val_change_points"] = round(
                    100 * (vc - row["clean_val_accuracy_base"]), 1
                )
    if "oracle_head" in feats:
        oracle = feats["oracle_head"]
        row["unseen_site_accuracy_oracle"] = round(acc(oracle, site_base, y[unseen]), 4)
        row["oracle_gain_points"] = round(
            100 * (row["unseen_site_accuracy_oracle"] - row["unseen_site_accuracy_base"]), 1
        )
        row["oracle_clean_test_change_points"] = round(
            100 * (acc(oracle, feats["test_x"], y) - row["clean_test_accuracy_base"]), 1
        )
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
