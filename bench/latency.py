"""Streaming latency under load, measured in one run on this machine.

One threads-pool worker (``-P threads -c 8``, as the README's Streaming section runs it)
against a scratch PostgreSQL database and Redis on 127.0.0.1:

1. the single-image service time: one image alone on an idle system, submitted -> row
   (``latency_ms``), the median of ``--singles`` such images;
2. the bulk capacity: ``--burst`` one-image messages sent as fast as the producer can, images/s
   from the first submission to the last row;
3. a steady stream at each ``--fractions`` of that capacity for ``--seconds`` (at most
   ``--max-images`` images): p50/p95/p99 of latency, and where the time went in the worker
   (the producer's ``send`` call, then the mean ms per image of each stage of
   ``sortline_stage_seconds``, scraped from the worker; ``queue`` includes ``send``),
   and the worker's CPU time per image (its processes' user + system time).

Prints a table, writes ``latency.json`` and ``latency.png`` (latency against load) to ``--out``.

    python bench/latency.py [--out DIR] [--seconds 30] [--fractions 0.25,0.5,0.75,0.9]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, Worker, drop_pg, images, machine, scratch_pg  # noqa: E402

STAGES = ("queue", "lookup", "decode", "batch_wait", "forward", "write")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_totals(port: int) -> dict[str, tuple[float, float]]:
    """(seconds, images) of each stage so far, from the worker's ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "sortline_stage_seconds":
            continue
        for s in fam.samples:
            stage = s.labels.get("stage")
            if s.name.endswith("_sum"):
                sums[stage] = s.value
            elif s.name.endswith("_count"):
                counts[stage] = s.value
    return {k: (sums.get(k, 0.0), counts.get(k, 0.0)) for k in STAGES}


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per image of each stage between two scrapes."""
    out = {}
    for k in STAGES:
        secs, n = after[k][0] - before[k][0], after[k][1] - before[k][1]
        out[k] = round(1000 * secs / n, 2) if n else None
    return out


def cpu_seconds(w: Worker) -> float:
    """User + system CPU time of the worker's processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in w.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def rows_of(job_id: str) -> list:
    from db.engine import session_scope
    from db.service import list_results

    with session_scope() as s:
        return list_results(s, job_id=job_id)


def stream(files: list[Path], rate: float | None, n: int, timeout: float) -> dict:
    """Send *n* images, one message each, at *rate* per second (None: as fast as possible)."""
    from producer.stream import StreamJob
    from producer.submit import wait_for_job

    t0 = time.time()
    sending = 0.0
    with StreamJob(source="bench-latency") as job:
        for i in range(n):
            if rate:
                delay = t0 + i / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
            t = time.perf_counter()
            job.send(files[i % len(files)])
            sending += time.perf_counter() - t
    sent_s = time.time() - t0
    wait_for_job(job.job_id, poll=0.05, timeout=timeout)
    rows = rows_of(job.job_id)
    if len(rows) != n or any(r.status != "ok" for r in rows):
        raise SystemExit(f"job {job.job_id}: {len(rows)} rows for {n} images, or error rows")
    last = max(r.submitted_at.timestamp() + r.latency_ms / 1000 for r in rows)
    return {"sent": n, "offered_rate": n / sent_s, "done_rate": n / (last - t0),
            "send_ms": round(1000 * sending / n, 2),
            "latency_ms": sorted(r.latency_ms for r in rows)}  # fmt: skip


def quantiles(lat: list[float]) -> dict[str, float]:
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"p50": round(q[49], 1), "p95": round(q[94], 1), "p99": round(q[98], 1),
            "max": round(lat[-1], 1)}  # fmt: skip


def singles(files: list[Path], k: int) -> tuple[list[float], float]:
    """Latency of *k* images sent one at a time, each alone on the system; mean send ms."""
    from producer.stream import StreamJob

    out, sending = [], 0.0
    with StreamJob(source="bench-latency-single") as job:
        for i in range(k):
            t = time.perf_counter()
            job.send(files[i % len(files)])
            sending += time.perf_counter() - t
            deadline = time.monotonic() + 60
            while len(rows := rows_of(job.job_id)) <= i:
                if time.monotonic() > deadline:
                    raise SystemExit("a single image took over 60 s")
                time.sleep(0.01)
            out.append(max(rows, key=lambda r: r.position).latency_ms)
            time.sleep(0.2)
    return out, round(1000 * sending / k, 2)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["rates"]
    x = [100 * r["fraction"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for q, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax.plot(x, [r[q] for r in runs], style, label=q)
    svc = result["service_ms"]
    for mult, pct in ((4, 50), (8, 75)):
        ax.plot([pct], [mult * svc], "kx", markersize=9)
        ax.annotate(f"target {mult}x service", (pct, mult * svc), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)  # fmt: skip
    ax.axhline(svc, color="grey", linestyle=":", label=f"single image alone {svc:.0f} ms")
    ax.set_xlabel(f"offered load, % of measured capacity ({result['capacity']:.1f} img/s)")
    ax.set_ylabel("latency, submitted -> row (ms)")
    ax.set_yscale("log")
    ax.set_title("sortline streaming latency under load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from training.config import DEFAULT_CHECKPOINT

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "trashnet")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "figures")
    ap.add_argument("--fractions", default="0.25,0.5,0.75,0.9")
    ap.add_argument("--seconds", type=float, default=30.0, help="streaming time per rate")
    ap.add_argument("--max-images", type=int, default=2000, help="images per rate at most")
    ap.add_argument("--burst", type=int, default=400, help="images of the capacity run")
    ap.add_argument("--singles", type=int, default=20, help="images of the service-time run")
    ap.add_argument("--capacity", type=float, help="img/s to take as capacity: no burst run")
    ap.add_argument("--concurrency", type=int, default=8, help="task threads of the worker")
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",") if f]

    files = images(args.data, max(args.burst, args.max_images))
    ckpt = args.checkpoint.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    os.environ.setdefault("SORTLINE_BROKER_URL", "redis://127.0.0.1:6379/13")
    import redis

    redis.from_url(os.environ["SORTLINE_BROKER_URL"]).flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="sortline-latency-"))
    db = scratch_pg()
    os.environ["SORTLINE_DATABASE_URL"] = db
    port = free_port()
    env = {
        "SORTLINE_DATABASE_URL": db,
        "SORTLINE_MODEL": str(ckpt),
        "SORTLINE_BROKER_URL": os.environ["SORTLINE_BROKER_URL"],
        "SORTLINE_CACHE_DIR": str(tmp / "cache"),
        "SORTLINE_METRICS_PORT": str(port),
        "SORTLINE_METRICS_ADDRESS": "127.0.0.1",
    }
    worker_args = ["-Q", "cpu", "-P", "threads", "-c", str(args.concurrency)]
    result: dict = {"machine": machine(), "worker": " ".join(worker_args), "model": ckpt.name,
                    "precision": os.environ.get("SORTLINE_PRECISION", "auto")}  # fmt: skip
    w = None
    try:
        from db.migrate import upgrade

        upgrade(db)
        w = Worker(env, worker_args, tmp / "worker.log")
        w.wait_ready()
        stream(files, None, 32, timeout=300)  # the model is loaded and warm

        before = stage_totals(port)
        single, send_ms = singles(files, args.singles)
        result["service_ms"] = svc = statistics.median(single)
        result["service_stages"] = {"send": send_ms, **stage_means(before, stage_totals(port))}
        print(f"single image alone, submitted -> row: median {svc:.1f} ms of {len(single)} "
              f"(min {min(single):.1f}, max {max(single):.1f}); stages (ms): "
              f"{result['service_stages']}")  # fmt: skip

        if args.capacity:
            result["capacity"] = cap = args.capacity
            print(f"capacity: {cap:.1f} img/s as given (--capacity)")
        else:
            before = stage_totals(port)
            burst = stream(files, None, args.burst, timeout=600)
            result["capacity"] = cap = burst["done_rate"]
            result["burst"] = {**quantiles(burst["latency_ms"]), "sent": burst["sent"],
                               "stages": {"send": burst["send_ms"],
                                          **stage_means(before, stage_totals(port))}}  # fmt: skip
            print(f"capacity: {args.burst} one-image messages as fast as possible: "
                  f"{cap:.1f} img/s (sent at {burst['offered_rate']:.1f}/s); stages (ms): "
                  f"{result['burst']['stages']}")  # fmt: skip

        result["rates"] = []
        print(f"{'load':>5} {'img/s':>6} {'images':>6} {'p50':>7} {'p95':>7} {'p99':>7} "
              f"{'p95/svc':>7} {'cpu ms':>7}  stages, mean ms per image")  # fmt: skip
        for f in fractions:
            n = min(args.max_images, max(20, int(f * cap * args.seconds)))
            before, cpu0 = stage_totals(port), cpu_seconds(w)
            run = stream(files, f * cap, n, timeout=args.seconds * 4 + 120)
            q = quantiles(run["latency_ms"])
            stages = {"send": run["send_ms"], **stage_means(before, stage_totals(port))}
            cpu_ms = round(1000 * (cpu_seconds(w) - cpu0) / n, 1)
            result["rates"].append({"fraction": f, "rate": round(f * cap, 2), "images": n,
                                    "offered_rate": round(run["offered_rate"], 2), **q,
                                    "p95_over_service": round(q["p95"] / svc, 2),
                                    "worker_cpu_ms": cpu_ms, "stages": stages})  # fmt: skip
            print(f"{100 * f:4.0f}% {f * cap:6.1f} {n:6d} {q['p50']:7.1f} {q['p95']:7.1f} "
                  f"{q['p99']:7.1f} {q['p95'] / svc:7.2f} {cpu_ms:7.1f}  {stages}")  # fmt: skip
    finally:
        if w is not None:
            w.stop()
        from db.engine import reset_engines

        reset_engines()
        drop_pg(db)
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    (args.out / "latency.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "latency.png")
    print(f"load average {result['load_average_end']:.2f} at end; wrote "
          f"{args.out / 'latency.json'} and {args.out / 'latency.png'}")  # fmt: skip


if __name__ == "__main__":
    main()
