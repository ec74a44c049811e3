"""Throughput and latency of classification, measured in one run on this machine.

(a) the reference study's loop: PIL open, torchvision transform, PyTorch forward, one image
    at a time; (b) sortline's in-process batched runtime (no queue, no database); (c) the
    full pipeline producer -> Redis -> Celery worker(s) -> PostgreSQL rows, with 1 and 2
    worker processes; (b) and (c) for each ONNX Runtime precision (fp32, int8: the int8 one
    needs the checkpoint's calibration, see `sortline quantize`); then streaming at a steady
    rate (p50/p95 end-to-end latency; bench/latency.py measures several loads) and the peak
    resident memory of each worker process.

    python bench/throughput.py [--data DIR] [--n 1000] [--checkpoint PATH] [--baseline PATH]
                               [--precisions fp32,int8]

With --baseline, (a), (b) and (c) are measured for both checkpoints, part by part in one run,
and the per-image cost of the model against the baseline's is printed for each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, Worker, drop_pg, images, machine, scratch_pg  # noqa: E402


def reference_loop(files: list[Path], checkpoint: Path) -> float:
    """(a) img/s of the reference notebook's per-image loop."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from training.model.checkpoint import load_checkpoint, preprocess_spec

    model, meta = load_checkpoint(checkpoint)
    spec = preprocess_spec(meta)
    tf = transforms.Compose([
        transforms.Resize(spec.resize), transforms.CenterCrop(spec.crop), transforms.ToTensor(),
        transforms.Normalize(spec.mean, spec.std),
    ])  # fmt: skip
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for f in files:
            x = tf(Image.open(f).convert("RGB")).unsqueeze(0)
            model(x).softmax(1)
    return len(files) / (time.perf_counter() - t0)


def batched_runtime(
    files: list[Path], checkpoint: Path, batch: int = 32, precision: str = "fp32"
) -> float:
    """(b) img/s of sortline's runtime in process: decode in a thread pool, batched ONNX Runtime."""
    from training.model.preprocess import load_and_preprocess
    from worker.runtime import Classifier

    clf = Classifier(checkpoint, runtime="onnx", device="cpu", precision=precision)
    import numpy as np

    def load(f: Path):
        return load_and_preprocess(f.read_bytes(), clf.spec)

    clf.predict(np.stack([load(files[0])]))  # warm up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        arrays = pool.map(load, files)
        buf = []
        for a in arrays:
            buf.append(a)
            if len(buf) == batch:
                clf.predict(np.stack(buf))
                buf = []
        if buf:
            clf.predict(np.stack(buf))
    return len(files) / (time.perf_counter() - t0)


def pipeline(
    files: list[Path], env: dict, worker_args: list[str], log: Path, batch: int, queue: str = "cpu"
) -> tuple[float, dict]:
    """(c) img/s from submit to the last row, through Redis, Celery workers and PostgreSQL."""
    from db.engine import session_scope
    from db.service import list_results
    from producer.submit import submit_paths, wait_for_job

    w = Worker(env, worker_args, log)
    try:
        w.wait_ready()
        warm = submit_paths(files[:64], batch_size=batch, queue=queue)
        wait_for_job(warm, timeout=300)  # the model is loaded
        t0 = time.perf_counter()
        job_id = submit_paths(files, batch_size=batch, queue=queue)
        job = wait_for_job(job_id, poll=0.05, timeout=1200)
        rate = len(files) / (time.perf_counter() - t0)
        with session_scope() as s:
            n = len(list_results(s, job_id=job_id))
        assert n == len(files) == job.done, (n, job.done)
        return rate, w.peak_rss_mb()
    finally:
        w.stop()


def streaming(
    files: list[Path], env: dict, worker_args: list[str], log: Path, rate: float, seconds: float
):
    """Steady *rate* images/s for *seconds*; p50/p95 of submitted -> row written, ms."""
    from db.engine import session_scope
    from db.service import list_results
    from producer.stream import StreamJob
    from producer.submit import wait_for_job

    w = Worker(env, worker_args, log)
    try:
        w.wait_ready()
        with StreamJob(source="bench") as warm:
            for f in files[:8]:
                warm.send(f)
        wait_for_job(warm.job_id, timeout=300)
        n = int(rate * seconds)
        t0 = time.perf_counter()
        with StreamJob(source="bench") as job:
            for i in range(n):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                job.send(files[i % len(files)])
        wait_for_job(job.job_id, timeout=120)
        with session_scope() as s:
            rows = list_results(s, job_id=job.job_id)
        lat = sorted(r.latency_ms for r in rows)
        q = statistics.quantiles(lat, n=100)
        return {"sent": n, "rows": len(rows), "p50": q[49], "p95": q[94], "max": lat[-1],
                "rss": w.peak_rss_mb()}  # fmt: skip
    finally:
        w.stop()


def main() -> None:
    from training.config import DEFAULT_CHECKPOINT

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "trashnet")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a second checkpoint measured in the same run, part by part (e.g. an older release)",
    )
    ap.add_argument(
        "--batch", type=int, default=8, help="forward-pass batch of (b), as SORTLINE_MAX_BATCH"
    )
    ap.add_argument("--stream-rate", type=float, default=20.0)
    ap.add_argument("--stream-seconds", type=float, default=60.0)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,stream")
    ap.add_argument(
        "--precisions", default="fp32,int8", help="ONNX Runtime precisions of (b) and (c)"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    precisions = [p for p in args.precisions.split(",") if p]

    files = images(args.data, args.n)
    for f in files:  # into the page cache, so that the first model measured pays no disk reads
        f.read_bytes()
    models = {"": args.checkpoint.resolve()}
    if args.baseline:
        models["baseline "] = args.baseline.resolve()
    print(f"machine: {machine()}")
    for label, ckpt in models.items():
        print(f"images: {len(files)} from {args.data}; {label or 'model '}{ckpt}")
    os.environ.setdefault("SORTLINE_BROKER_URL", "redis://127.0.0.1:6379/12")
    tmp = Path(tempfile.mkdtemp(prefix="sortline-bench-"))
    import redis

    redis.from_url(os.environ["SORTLINE_BROKER_URL"]).flushdb()
    results: dict[str, float] = {}  # "<label><part>", e.g. "b-int8", "baseline b-int8"
    if "a" not in skip:  # each part measured for every model before the next part
        for label, ckpt in models.items():
            results[f"{label}a"] = rate = reference_loop(files, ckpt)
            print(f"{label}(a) reference loop, PyTorch eager, one image at a time: "
                  f"{rate:7.1f} img/s")  # fmt: skip
    if "b" not in skip:
        for p in precisions:
            for label, ckpt in models.items():
                results[f"{label}b-{p}"] = rate = batched_runtime(files, ckpt, args.batch, p)
                print(f"{label}(b) sortline runtime in process (ONNX Runtime {p}, batch "
                      f"{args.batch}): {rate:7.1f} img/s")  # fmt: skip
    db = scratch_pg()
    os.environ["SORTLINE_DATABASE_URL"] = db
    env = {
        "SORTLINE_DATABASE_URL": db,
        "SORTLINE_MODEL": str(models[""]),
        "SORTLINE_BROKER_URL": os.environ["SORTLINE_BROKER_URL"],
        "SORTLINE_CACHE_DIR": str(tmp / "cache"),
    }
    try:
        from db.migrate import upgrade

        upgrade(db)
        if "c" not in skip:
            for p in precisions:
                for procs in (1, 2):
                    for label, ckpt in models.items():
                        rate, rss = pipeline(
                            files, {**env, "SORTLINE_MODEL": str(ckpt), "SORTLINE_PRECISION": p},
                            ["-Q", "cpu", "-c", str(procs)],
                            tmp / f"c{procs}-{p}-{label.strip()}.log", args.batch,
                        )  # fmt: skip
                        results[f"{label}c{procs}-{p}"] = rate
                        peak = max(v for k, v in rss.items())
                        print(f"{label}(c) full pipeline, {procs} worker process(es), {p}, "
                              f"PostgreSQL: {rate:7.1f} img/s  (peak RSS per process "
                              f"{peak:.0f} MB)")  # fmt: skip
        if "stream" not in skip:
            st = streaming(files, env, ["-Q", "cpu", "-P", "threads", "-c", "8"], tmp / "stream.log",
                           args.stream_rate, args.stream_seconds)  # fmt: skip
            print(f"streaming {args.stream_rate:.0f} img/s for {args.stream_seconds:.0f} s: "
                  f"{st['rows']}/{st['sent']} rows,"
                  f" latency p50 {st['p50']:.0f} ms, p95 {st['p95']:.0f} ms, max {st['max']:.0f} ms;"
                  f" worker peak RSS {max(st['rss'].values()):.0f} MB")  # fmt: skip
    finally:
        from db.engine import reset_engines

        reset_engines()
        drop_pg(db)
    if args.baseline:
        for key in sorted(k for k in results if not k.startswith("baseline ")):
            base = results.get(f"baseline {key}")
            if base:  # per-image cost is 1 / rate
                print(f"per-image cost, model / baseline ({key}): {base / results[key]:.2f} "
                      "(target <= 1.5)")  # fmt: skip
    for p in precisions:
        b = results.get(f"b-{p}")
        best_c = max((v for k, v in results.items() if k.startswith("c") and k.endswith(p)),
                     default=None)  # fmt: skip
        if "a" in results and b and best_c:
            print(f"ratios ({p}): (c)/(a) = {best_c / results['a']:.2f} (target >= 2), "
                  f"(c)/(b) = {best_c / b:.2f} (target >= 0.75)")  # fmt: skip
    if "fp32" in precisions and "int8" in precisions:
        for part in ("b", "c1", "c2"):
            f32, i8 = results.get(f"{part}-fp32"), results.get(f"{part}-int8")
            if f32 and i8:
                print(f"int8/fp32 ({part}): {i8 / f32:.2f} (target >= 1.5)")


if __name__ == "__main__":
    main()
