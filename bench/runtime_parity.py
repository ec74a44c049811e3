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
    from training.model.export import read_calibration
    from training.model.preprocess import load_and_preprocess
    from training.reports.metrics import classification_metrics
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
    clfs = {
        "torch": Classifier(args.checkpoint, runtime="torch", device="cpu"),
        "onnx fp32": Classifier(args.checkpoint, runtime="onnx", device="cpu", precision="fp32"),
    }
    if read_calibration(args.checkpoint) is not None:
        clfs["onnx int8"] = Classifier(
            args.checkpoint, runtime="onnx", device="cpu", precision="int8"
        )
    spec, classes = clfs["torch"].spec, clfs["torch"].classes
    probs: dict[str, list] = {k: [] for k in clfs}
    for i in range(0, len(files), 32):
        x = np.stack([load_and_preprocess(f.read_bytes(), spec) for f in files[i : i + 32]])
        for k, clf in clfs.items():
            probs[k].append(clf.predict(x))
    # predict's columns: the class probabilities, then the unfamiliarity score (not a class)
    p = {k: np.concatenate(v)[:, : len(classes)] for k, v in probs.items()}
    y = [classes.index(f.parent.name) if f.parent.name in classes else -1 for f in files]
    print(f"machine: {machine()}")
    print(f"{len(files)} images from {args.data}; {args.checkpoint.name}")
    ref = p["torch"]
    for k, v in p.items():
        line = f"{k:10s}"
        if all(c >= 0 for c in y):
            m = classification_metrics(y, v.argmax(1).tolist(), classes)
            line += f" accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f};"
        if k != "torch":
            agree = int((v.argmax(1) == ref.argmax(1)).sum())
            line += f" labels agree with torch {agree}/{len(files)}, max |p - p_torch| {np.abs(v - ref).max():.2e}"
        print(line)
    if "onnx int8" in p:
        agree = int((p["onnx int8"].argmax(1) == p["onnx fp32"].argmax(1)).sum())
        print(
            f"int8 labels agree with fp32: {agree}/{len(files)} ({agree / len(files):.2%}; target >= 99%)"
        )
    else:
        print("no int8 calibration beside the checkpoint: `sortline quantize DATA` makes one")


if __name__ == "__main__":
    main()
