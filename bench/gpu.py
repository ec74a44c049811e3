"""The GPU path, measured: in-process PyTorch fp16 channels_last, ONNX Runtime's CUDA or
TensorRT provider where installed, and the full pipeline through a `-Q gpu` worker.

    python bench/gpu.py [--data DIR] [--n 2000] [--batch 64] [--checkpoint PATH]

Prints one line per figure; without CUDA it says so and measures nothing (exit 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, drop_pg, images, machine, scratch_pg  # noqa: E402
from bench.throughput import pipeline  # noqa: E402


def _rate(predict, arrays: np.ndarray, batch: int) -> float:
    predict(arrays[:batch])  # warm up (cuDNN autotuning, TensorRT engine build)
    t0 = time.perf_counter()
    for i in range(0, len(arrays), batch):
        predict(arrays[i : i + batch])
    return len(arrays) / (time.perf_counter() - t0)


def main() -> None:
    import torch

    from training.config import DEFAULT_CHECKPOINT
    from training.model.export import cached_onnx
    from training.model.preprocess import load_and_preprocess
    from worker.runtime import Classifier

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "trashnet")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if not torch.cuda.is_available():
        print("no CUDA device: GPU figures skipped")
        return
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    ckpt = args.checkpoint.resolve()
    files = images(args.data, args.n)
    clf = Classifier(ckpt, device="cuda", runtime="torch")
    arrays = np.stack([load_and_preprocess(f.read_bytes(), clf.spec) for f in files])
    rate = _rate(clf.predict, arrays, args.batch)
    print(f"(b-gpu) PyTorch fp16 channels_last, batch {args.batch}, model only: {rate:7.1f} img/s")
    import onnxruntime as ort

    onnx = cached_onnx(ckpt, precision="fp32")
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if provider not in ort.get_available_providers():
            print(f"(b-gpu) ONNX Runtime {provider}: not installed, skipped")
            continue
        try:
            sess = ort.InferenceSession(str(onnx), providers=[provider, "CPUExecutionProvider"])
            rate = _rate(lambda x, s=sess: s.run(None, {"input": x}), arrays, args.batch)
            print(f"(b-gpu) ONNX Runtime {provider} fp32, batch {args.batch}: {rate:7.1f} img/s")
        except Exception as e:  # a provider whose libraries are missing: say so, go on
            print(f"(b-gpu) ONNX Runtime {provider}: failed ({type(e).__name__}: {e})")
    os.environ.setdefault("SORTLINE_BROKER_URL", "redis://127.0.0.1:6379/12")
    tmp = Path(tempfile.mkdtemp(prefix="sortline-gpu-bench-"))
    db = scratch_pg()
    os.environ["SORTLINE_DATABASE_URL"] = db
    env = {"SORTLINE_DATABASE_URL": db, "SORTLINE_MODEL": str(ckpt), "SORTLINE_DEVICE": "cuda",
           "SORTLINE_MAX_BATCH": str(args.batch), "SORTLINE_CACHE_DIR": str(tmp / "cache"),
           "SORTLINE_BROKER_URL": os.environ["SORTLINE_BROKER_URL"]}  # fmt: skip
    try:
        from db.migrate import upgrade

        upgrade(db)
        rate, _ = pipeline(files, env, ["-Q", "gpu", "-c", "1"], tmp / "gpu.log", args.batch,
                           queue="gpu")  # fmt: skip
        print(f"(c-gpu) full pipeline, 1 GPU worker process, PostgreSQL: {rate:7.1f} img/s")
    finally:
        from db.engine import reset_engines

        reset_engines()
        drop_pg(db)


if __name__ == "__main__":
    main()
