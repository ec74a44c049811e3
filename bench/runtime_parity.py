"""Do ONNX Runtime and PyTorch agree on a checkpoint? Labels and probabilities over a folder.

    python bench/runtime_parity.py [--data DIR] [--checkpoint PATH]

Default data: the held-out test split of the shipped model's training run, rebuilt from
`sortline split /work/shared/trashnet --manifest-dir runs/split --link test runs/split-test` (see the
model card).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine  # noqa: E402


def main() -> None:
    from training.config import DEFAULT_CHECKPOINT
    from training.model.preprocess import load_and_preprocess
    from worker.runtime import Classifier

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=Path("runs/split-test"))
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = ap.parse_args()
    files = sorted(set(args.data.rglob("*.jpg")))
    if not files:
        sys.exit(f"no *.jpg under {args.data}; build it first (see this script's docstring)")
    onnx = Classifier(args.checkpoint, runtime="onnx", device="cpu")
    torch_ = Classifier(args.checkpoint, runtime="torch", device="cpu")
    p1, p2 = [], []
    for i in range(0, len(files), 32):
        x = np.stack([load_and_preprocess(f.read_bytes(), onnx.spec) for f in files[i : i + 32]])
        p1.append(onnx.predict(x))
        p2.append(torch_.predict(x))
    a, b = np.concatenate(p1), np.concatenate(p2)
    agree = int((a.argmax(1) == b.argmax(1)).sum())
    print(f"machine: {machine()}")
    print(f"{len(files)} images from {args.data}; {args.checkpoint.name}")
    print(f"labels agree: {agree}/{len(files)}; max |p_onnx - p_torch| = {np.abs(a - b).max():.2e}")


if __name__ == "__main__":
    main()
