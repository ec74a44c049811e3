"""Producer commands: ``submit``, ``status``, ``results``, ``jobs``."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import click

from db.config import get_db_settings
from db.engine import session_scope
from db.service import get_job, job_state, label_counts, list_jobs, list_results
from db.text import clean_text, csv_cell
from producer.submit import (
    WHEN_FULL,
    queue_depth,
    queue_line,
    submit_bytes,
    submit_paths,
    wait_for_job,
)
from sortline.names import INFERENCE_QUEUES

RESULT_FIELDS = (
    "position", "ref", "status", "label", "confidence", "error", "needs_review",
    "unfamiliarity", "unfamiliar", "model_version", "worker", "processing_ms", "sha256",
)  # fmt: skip


def _job_dict(job) -> dict:
    return {
        "job_id": job.id,
        "status": job_state(job, stalled_after=get_db_settings().reconcile_after),
        "kind": job.kind,
        "queue": job.queue,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "model_version": job.model_version,
        "source": job.source,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def _wait_with_progress(job_id: str, quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if quiet:
        return wait_for_job(job_id)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=__import__("rich.console").console.Console(stderr=True),
    ) as bar:
        task = bar.add_task(f"job {job_id[:8]}", total=None)
        return wait_for_job(job_id, on_progress=lambda n, t: bar.update(task, completed=n, total=t))


def _print_summary(job_id: str, as_json: bool, *, with_queue: bool = False) -> None:
    with session_scope() as session:
        job = get_job(session, job_id=job_id)
        counts = label_counts(session, job_id=job.id)
    info = _job_dict(job)
    depth = queue_depth(job.queue) if with_queue else None
    if as_json:
        click.echo(
            json.dumps(
                {
                    **info,
                    "labels": counts,
                    **({"queue_depth": depth} if with_queue else {}),
                }
            )
        )
        return
    click.echo(f"job {job.id}: {info['status']}, {job.done} labelled, {job.failed} errors")
    for label, n in counts.items():
        click.echo(f"  {clean_text(label):<12} {n}")
    if with_queue:
        click.echo(queue_line(job.queue, depth))


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders.")
@click.option("--pattern", help="Only files whose name matches this glob (default: image files).")
@click.option(
    "--queue", type=click.Choice(INFERENCE_QUEUES), help="Queue (default SORTLINE_QUEUE)."
)
@click.option("--batch-size", type=click.IntRange(1, 512), help="Images per task message.")
@click.option(
    "--bytes", "as_bytes", is_flag=True, help="Send image bytes, not paths ('-' = stdin)."
)
@click.option(
    "--when-full", type=click.Choice(WHEN_FULL), default="wait", show_default=True,
    help="When the queue holds SORTLINE_MAX_QUEUED images: wait for room, or refuse the job.",
)  # fmt: skip
@click.option("--wait", is_flag=True, help="Show progress until the job finishes, then a summary.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def submit(
    paths, recursive, pattern, queue, batch_size, as_bytes, when_full, wait, as_json
) -> None:
    """Classify image files, folders or globs (PATHS) as one job; print its id."""
    if as_bytes:
        from producer.submit import expand_paths
        from worker.config import get_worker_settings
        from worker.inputs import read_local_file, read_stream

        limit = get_worker_settings().max_image_bytes  # checked before anything is read
        blobs = []
        for p in paths:
            if p == "-":
                blobs.append(("stdin", read_stream(sys.stdin.buffer, max_bytes=limit)))
            else:
                for f in expand_paths([p], recursive=recursive, pattern=pattern):
                    blobs.append((f, read_local_file(f, max_bytes=limit)))
        job_id = submit_bytes(
            blobs, queue=queue, batch_size=batch_size, source=", ".join(paths), when_full=when_full
        )
    else:
        job_id = submit_paths(
            paths, recursive=recursive, pattern=pattern, queue=queue, batch_size=batch_size,
            when_full=when_full,
        )  # fmt: skip
    if wait:
        _wait_with_progress(job_id, quiet=as_json)
        _print_summary(job_id, as_json)
    elif as_json:
        click.echo(json.dumps({"job_id": job_id}))
    else:
        click.echo(job_id)


@click.command()
@click.argument("job")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job: str, as_json: bool) -> None:
    """Show a job's progress, its labels so far and its queue's depth (JOB: id, prefix or 'latest')."""
    _print_summary(job, as_json, with_queue=True)


@click.command()
@click.option("--limit", default=20, show_default=True, help="How many jobs.")
def jobs(limit: int) -> None:
    """List the newest jobs."""
    with session_scope() as session:
        rows = [_job_dict(j) for j in list_jobs(session, limit=limit)]
    for j in rows:
        click.echo(
            f"{j['job_id']}  {j['status']:<8} {j['done'] + j['failed']:>6}/{j['total']:<6} "
            f"{j['queue']:<4} {j['created_at'][:19]}  {clean_text(j['source'])[:50]}"
        )


def _result_dict(r) -> dict:
    d = {f: getattr(r, f) for f in RESULT_FIELDS}
    if r.corrected_label:
        d["corrected_label"] = r.corrected_label
    d["probs"] = r.probs
    return d


def _emit(rows: list[dict], fmt: str, header: bool = True) -> None:
    if fmt == "json":
        for d in rows:
            click.echo(json.dumps(d))
    elif fmt == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=[*RESULT_FIELDS, "corrected_label", "probs"])
        if header:
            w.writeheader()
        for d in rows:  # no cell a spreadsheet would run as a formula
            d = {**d, "probs": json.dumps(d["probs"]) if d["probs"] else ""}
            w.writerow({k: csv_cell(v) for k, v in d.items()})
    else:
        if header:
            click.echo(f"{'pos':>5}  {'label':<10} {'conf':>6}  file / error")
        for d in rows:
            label = d.get("corrected_label") or d["label"] or "ERROR"
            conf = f"{d['confidence']:.3f}" if d["confidence"] is not None else "-"
            tail = Path(d["ref"]).name if d["status"] == "ok" else f"{d['ref']}: {d['error']}"
            click.echo(f"{d['position']:>5}  {clean_text(label):<10} {conf:>6}  {clean_text(tail)}")


@click.command()
@click.argument("job")
@click.option("--label", help="Only this label.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), help="Confidence at least this.")
@click.option("--max-confidence", type=click.FloatRange(0, 1), help="Confidence at most this.")
@click.option("--errors", is_flag=True, help="Only images that failed.")
@click.option(
    "--needs-review", is_flag=True, help="Only images marked for review (doubtful or unfamiliar)."
)
@click.option("--limit", type=int, help="At most this many rows.")
@click.option(
    "--follow", is_flag=True, help="Keep printing rows as they are written until the job is done."
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
    show_default=True, help="Output format (json: one object per line).",
)  # fmt: skip
def results(
    job, label, min_confidence, max_confidence, errors, needs_review, limit, follow, fmt
) -> None:
    """Print a job's per-image results (JOB: id, prefix or 'latest')."""
    if follow:
        follow_results(job, fmt)
        return
    with session_scope() as session:
        j = get_job(session, job_id=job)
        rows = [
            _result_dict(r)
            for r in list_results(
                session,
                job_id=j.id,
                label=label,
                status="error" if errors else None,
                min_confidence=min_confidence,
                max_confidence=max_confidence,
                needs_review=True if needs_review else None,
                limit=limit,
            )
        ]
    _emit(rows, fmt)


@click.command()
@click.option(
    "--watch",
    "watch_dir",
    type=click.Path(exists=True, file_okay=False),
    help="Watch this folder for new files instead of reading stdin.",
)
@click.option(
    "--pattern", help="With --watch: only names matching this glob (default: image files)."
)
@click.option(
    "--queue", type=click.Choice(INFERENCE_QUEUES), help="Queue (default SORTLINE_QUEUE)."
)
def stream(watch_dir: str | None, pattern: str | None, queue: str | None) -> None:
    """Submit images as they arrive: paths on stdin (one per line), or new files in --watch DIR.

    Prints the streaming job's id first; follow it with `sortline results --follow JOB`.
    The job is closed at end of input (or Ctrl-C).
    """
    from producer.stream import StreamJob, lines_to_paths, watch_folder

    source = f"watch {watch_dir}" if watch_dir else "stdin"
    with StreamJob(queue=queue, source=source) as job:
        click.echo(job.job_id)
        sys.stdout.flush()
        paths = watch_folder(watch_dir, pattern=pattern) if watch_dir else lines_to_paths(sys.stdin)
        try:
            for p in paths:
                job.send(p)
        except KeyboardInterrupt:
            pass
    click.echo(f"closed job {job.job_id} after {job.sent} images", err=True)


def follow_results(job_id: str, fmt: str, poll: float = 0.3) -> None:
    """Print a job's rows as they are written until the job is done."""
    seen: set[int] = set()
    last_id = 0
    header = True
    while True:
        with session_scope() as session:
            j = get_job(session, job_id=job_id)
            # rewind a little: ids of concurrent transactions can commit out of order
            new = [
                r
                for r in list_results(session, job_id=j.id, after_id=max(0, last_id - 1000))
                if r.id not in seen
            ]
            done = j.status == "done"
        if new:
            _emit([_result_dict(r) for r in new], fmt, header=header)
            header = False
            seen.update(r.id for r in new)
            last_id = max(last_id, *(r.id for r in new))
            sys.stdout.flush()
        elif done:
            return
        time.sleep(poll)
