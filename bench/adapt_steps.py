"""Seconds per fine-tune step of `sortline adapt` at several training crop sizes, with its
first layers frozen or not, one run.

The real step: ``training.fit.adapt.finetune`` on 16 photos (8 "reviewed", 8 replayed, half
of those in a site look fitted on the reviewed ones), random crops of one size throughout
(`full_steps=0`) and flips, forward, backward and AdamW, on this machine's CPU threads;
``--frozen`` lists how many of the first layers keep the base's weights
(``AdaptParams.frozen``: no backward pass through them). The reviewed photos are training
photos under the proxy's ``site`` corruption (their labels do not matter here, only the time).
``--allocator`` times glibc's default allocator (``default``) and the one `sortline adapt`
runs under (``kept``: ``training.fit.memory.keep_freed_memory``), in that order per setting.

    python bench/adapt_steps.py [--data DIR] [--checkpoint PATH] [--crops 260,224,192]
                                [--frozen 0,5] [--steps 30] [--allocator default,kept]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("/work/shared/trashnet"))
    ap.add_argument("--checkpoint", type=Path, default=Path("models/sortline-trashnet.safetensors"))
    ap.add_argument("--cache", type=Path, default=Path("cache"))
    ap.add_argument("--crops", default="260,224,192")
    ap.add_argument("--frozen", default="0,5", help="AdaptParams.frozen values to time")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--allocator", default="kept", help="default (glibc's), kept, or both: default,kept"
    )
    a = ap.parse_args()
    from training.data.augment import SiteLook
    from training.data.dataset import load_resized, load_split
    from training.fit.adapt import AdaptParams, finetune
    from training.fit.memory import keep_freed_memory
    from training.fit.robustness import corrupt
    from training.model.checkpoint import load_checkpoint, preprocess_spec

    torch.set_num_threads(2)
    base, meta = load_checkpoint(a.checkpoint)
    spec = preprocess_spec(meta)
    ds = load_split(a.data, seed=int(meta["training"]["split_seed"]))
    train = ds.split("train")[:96]
    imgs = load_resized(ds, train, short_side=spec.resize, cache_dir=a.cache)
    ys = np.array([ds.label_index(s) for s in train], np.int64)
    site = [np.asarray(p.convert("RGB")) for p in corrupt(imgs[:48], "site")]
    look = SiteLook.fit(site, imgs[48:], seed=0).apply
    print(json.dumps({"model": meta["arch"], "input_px": spec.crop, "threads": 2}))
    for frozen in [int(f) for f in a.frozen.split(",")]:
        for crop in [int(c) for c in a.crops.split(",")]:
            for allocator in a.allocator.split(","):
                model = copy.deepcopy(base).to(memory_format=torch.channels_last)
                params = AdaptParams(steps=a.steps, crop=crop, full_steps=0, frozen=frozen)
                with keep_freed_memory() if allocator == "kept" else nullcontext():
                    t0 = time.perf_counter()
                    finetune(model, spec, (site, ys[:48]), (imgs[48:], ys[48:]), params,
                             look=look)  # fmt: skip
                    per_step = (time.perf_counter() - t0) / a.steps
                print(json.dumps({"frozen": frozen, "crop_px": crop, "allocator": allocator,
                                  "seconds_per_step": round(per_step, 3),
                                  "seconds_for_600_steps": round(600 * per_step)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
