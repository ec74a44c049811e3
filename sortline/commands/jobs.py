"""Producer commands: ``submit``, ``status``, ``results``, ``jobs``."""

from __future__ import annotations

import csv
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.progress import ProgressColumn
from rich.text import Text

from db.config import get_db_settings
from db.engine import session_scope
from db.service import (
    FINAL,
    get_job,
    job_classes,
    job_state,
    label_counts,
    list_jobs,
    list_results,
    review_count,
)
from db.text import clean_text, csv_cell
from producer.submit import (
    WHEN_FULL,
    queue_depth,
    queue_line,
    submit_bytes,
    submit_paths,
    wait_for_job,
)
from sortline.cli import fail
from sortline.commands.records import image_record
from sortline.names import INFERENCE_QUEUES

# a result row's fields beside the shared image record (sortline.commands.records)
JOB_FIELDS = ("position", "corrected_label", "model_version", "worker", "processing_ms", "sha256")
CSV_FIELDS = (
    "position",
    "ref",
    "status",
    "label",
    "confidence",
    "error",
    "needs_review",
    "unfamiliarity",
    "unfamiliar",
    *JOB_FIELDS[1:],
)


def _elapsed(job) -> float:
    end = job.finished_at or datetime.now(UTC)
    start = job.created_at
    if start.tzinfo is None:  # SQLite gives naive datetimes (stored as UTC)
        start, end = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
    return max(0.0, (end - start).total_seconds())


def _job_dict(job) -> dict:
    elapsed = _elapsed(job)
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
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(job.finished / elapsed, 2) if elapsed > 0 else None,
    }


class _RateColumn(ProgressColumn):
    """Images per second of a progress bar's task."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:
            speed = task.completed / task.elapsed
        return Text("-" if speed is None else f"{speed:.1f} img/s")


class _WorkerWatch:
    """Says once (and again when it changes) whether any worker consumes a stalled job's queue."""

    def __init__(self, queue: str, say, *, stall: float = 3.0, every: float = 15.0) -> None:
        self.queue, self.say, self.stall, self.every = queue, say, stall, every
        self.last_n, self.since, self.checked, self.missing = -1, time.monotonic(), 0.0, False

    def __call__(self, n: int, total: int) -> None:
        now = time.monotonic()
        if n != self.last_n:
            self.last_n, self.since = n, now
            return
        if now - self.since < self.stall or now - self.checked < self.every:
            return
        from worker.health import check_workers

        self.checked = now
        missing = not check_workers(queues=[self.queue], timeout=2.0).ok
        if missing and not self.missing:
            self.say(
                f"no worker consumes queue {self.queue}: start one with "
                f"`sortline worker --queues {self.queue}` (or `sortline up`); still waiting"
            )
        elif self.missing and not missing:
            self.say(f"a worker now consumes queue {self.queue}")
        self.missing = missing


class _Interrupts:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, but never inside a ``guarded()`` section (a
    database call cut half-way makes psycopg raise other errors, with a traceback): there it
    is noted, and raised as the section ends or at the next :meth:`check`."""

    def __init__(self, *signums: int) -> None:
        self.signums = signums or (signal.SIGINT,)
        self.depth, self.pending = 0, False

    def __enter__(self) -> _Interrupts:
        self.before = {n: signal.signal(n, self._handle) for n in self.signums}
        return self

    def __exit__(self, *exc) -> None:
        for n, handler in self.before.items():
            signal.signal(n, handler)

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise a noted interrupt now."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextmanager
    def guarded(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth:
            self.check()


def _wait_with_progress(
    job_id: str, queue: str, quiet: bool, timeout: float | None, check: Callable[[], None]
):
    """Wait for the job with a progress bar (rate, ETA) on stderr, or quietly; return it.

    *check* runs before each poll (it raises to stop waiting).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if quiet:
        watch = _WorkerWatch(queue, lambda m: click.echo(m, err=True))

        def quietly(n: int, total: int) -> None:
            check()
            watch(n, total)

        return wait_for_job(job_id, timeout=timeout, on_progress=quietly)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        "ETA",
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"job {job_id[:8]}", total=None)
        watch = _WorkerWatch(queue, bar.console.print)

        def progress(n: int, total: int) -> None:
            check()
            bar.update(task, completed=n, total=total)
            watch(n, total)

        return wait_for_job(job_id, timeout=timeout, on_progress=progress)


def _goes_on(job_id: str) -> str:
    return (
        f"the job goes on: `sortline status {job_id[:8]}` or `sortline results --follow "
        f"{job_id[:8]}` follows it, `sortline cancel {job_id[:8]}` stops it"
    )


def _print_summary(job_id: str, as_json: bool, *, with_queue: bool = False):
    with session_scope() as session:
        job = get_job(session, job_id=job_id)
        counts = label_counts(session, job_id=job.id)
        review = review_count(session, job_id=job.id)
    d = _job_dict(job)
    depth = queue_depth(job.queue) if with_queue else None
    if as_json:
        extra = {"queue_depth": depth} if with_queue else {}
        click.echo(json.dumps({**d, "needs_review": review, "labels": counts, **extra}))
        return job
    click.echo(
        f"job {job.id}: {d['status']}, {job.done} labelled, {job.failed} errors, "
        f"{review} need review"
    )
    rate = f" ({d['images_per_s']:.1f} images/s)" if d["images_per_s"] else ""
    click.echo(
        f"  model {job.model_version or '-'}; {job.finished}/{job.total} images in "
        f"{d['elapsed_s']:.1f} s{rate}"
    )
    for label, n in counts.items():
        click.echo(f"  {clean_text(label):<12} {n}")
    if with_queue:
        click.echo(queue_line(job.queue, depth))
    return job


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
    "--when-full",
    type=click.Choice(WHEN_FULL),
    default="wait",
    show_default=True,
    help="When the queue holds SORTLINE_MAX_QUEUED images: wait for room, or refuse the job.",
)
@click.option(
    "--worker-paths",
    is_flag=True,
    help="Send paths that do not exist here as they are (only the workers see the files).",
)
@click.option("--wait", is_flag=True, help="Show progress until the job finishes, then a summary.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, min_open=True),
    help="With --wait: stop waiting after this many seconds (exit 1; the job goes on).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def submit(
    paths,
    recursive,
    pattern,
    queue,
    batch_size,
    as_bytes,
    when_full,
    worker_paths,
    wait,
    timeout,
    as_json,
) -> None:
    """Classify image files, folders or globs (PATHS) as one job; print its id.

    With --wait, exits 1 when no image of the job could be labelled.
    """
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
            paths,
            recursive=recursive,
            pattern=pattern,
            queue=queue,
            batch_size=batch_size,
            when_full=when_full,
            worker_paths=worker_paths,
        )
    if wait:
        with _Interrupts() as interrupts, interrupts.guarded():
            try:
                if not as_json:
                    click.echo(job_id)
                queue = job_queue(job_id)
                job = _wait_with_progress(job_id, queue, as_json, timeout, interrupts.check)
            except KeyboardInterrupt:
                fail(f"stopped waiting; {_goes_on(job_id)}", 130)
            except TimeoutError:
                fail(f"job {job_id} not finished after {timeout:g} s; {_goes_on(job_id)}")
        job = _print_summary(job.id, as_json)
        if job.status in ("cancelled", "failed"):
            fail(f"job {job.id} {job.status}")
        if job.total and not job.done:
            fail(
                f"no image of job {job.id[:8]} was labelled ({job.failed} errors); "
                f"`sortline results {job.id[:8]} --errors` says why"
            )
    elif as_json:
        click.echo(json.dumps({"job_id": job_id}))
    else:
        click.echo(job_id)


def job_queue(job_id: str) -> str:
    with session_scope() as session:
        return get_job(session, job_id=job_id).queue


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
    if not rows:
        click.echo("no jobs yet; `sortline submit PATH` creates one")
        return
    click.echo(
        f"{'job':<32}  {'status':<9} {'finished':>13} {'queue':<5} {'created (UTC)':<19}  source"
    )
    for j in rows:
        click.echo(
            f"{j['job_id']}  {j['status']:<9} {j['done'] + j['failed']:>6}/{j['total']:<6} "
            f"{j['queue']:<5} {j['created_at'][:19]}  {clean_text(j['source'])[:50]}"
        )


def _result_dict(r) -> dict:
    return image_record(
        r.ref,
        label=r.label,
        confidence=r.confidence,
        probabilities=r.probs,
        unfamiliarity=r.unfamiliarity,
        unfamiliar=r.unfamiliar,
        needs_review=r.needs_review,
        error=r.error,
        **{f: getattr(r, f) for f in JOB_FIELDS},
    )


def _note(d: dict) -> str:
    if d["corrected_label"]:
        return f"corrected (model: {d['label']})"
    if d["needs_review"]:
        return "unfamiliar" if d["unfamiliar"] else "needs review"
    return ""


def _emit(rows: list[dict], fmt: str, classes: list[str] | None, header: bool = True) -> None:
    if fmt == "json":
        for d in rows:
            click.echo(json.dumps(d))
    elif fmt == "csv":
        probs = [f"p_{c}" for c in classes or []]
        w = csv.DictWriter(sys.stdout, fieldnames=[*CSV_FIELDS, *probs], extrasaction="ignore")
        if header:
            w.writeheader()
        for d in rows:  # no cell a spreadsheet would run as a formula
            p = d["probabilities"] or {}
            d = {**d, **{f"p_{c}": p.get(c, "") for c in classes or []}}
            w.writerow({k: csv_cell(v) for k, v in d.items()})
    else:
        if header:
            click.echo(f"{'pos':>5}  {'label':<10} {'conf':>6}  {'note':<14} file / error")
        for d in rows:
            label = d["corrected_label"] or d["label"] or "ERROR"
            conf = f"{d['confidence']:.3f}" if d["confidence"] is not None else "-"
            tail = Path(d["ref"]).name if d["status"] == "ok" else f"{d['ref']}: {d['error']}"
            click.echo(
                f"{d['position']:>5}  {clean_text(label):<10} {conf:>6}  {_note(d):<14} "
                f"{clean_text(tail)}"
            )


def _check_label(label: str, classes: list[str] | None) -> None:
    if classes and label not in classes:
        import difflib

        near = difflib.get_close_matches(label, classes, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise click.BadParameter(
            f"{label!r} is not a class of this job's model; {hint}classes: {', '.join(classes)}",
            param_hint="'--label'",
        )


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
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="table (needs-review and corrected rows marked), csv (p_<class> columns), json (one "
    "object per line, as `sortline predict --json`).",
)
def results(
    job, label, min_confidence, max_confidence, errors, needs_review, limit, follow, fmt
) -> None:
    """Print a job's per-image results (JOB: id, prefix or 'latest')."""
    if follow:
        follow_results(job, fmt)
        return
    with session_scope() as session:
        j = get_job(session, job_id=job)
        classes = job_classes(session, job_id=j.id)
        if label is not None:
            _check_label(label, classes)
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
    _emit(rows, fmt, classes)


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
    The job is closed at end of input, Ctrl-C or SIGTERM (`sortline close JOB` closes one left
    open).
    """
    from producer.stream import StreamJob, lines_to_paths, watch_folder

    source = f"watch {watch_dir}" if watch_dir else "stdin"
    with _Interrupts(signal.SIGINT, signal.SIGTERM) as interrupts:
        with interrupts.guarded():  # created, and later closed, whatever the signal's timing
            job = StreamJob(queue=queue, source=source)
        try:
            click.echo(job.job_id)
            sys.stdout.flush()
            paths = (
                watch_folder(watch_dir, pattern=pattern) if watch_dir else lines_to_paths(sys.stdin)
            )
            for p in paths:
                with interrupts.guarded():
                    job.send(p)
        except KeyboardInterrupt:
            pass
        finally:
            with interrupts.guarded():
                job.close()
                interrupts.pending = False  # stopping is what close does
    click.echo(f"closed job {job.job_id} after {job.sent} images", err=True)


def follow_results(job_id: str, fmt: str, poll: float = 0.3) -> None:
    """Print a job's rows as they are written until the job is done."""
    seen: set[int] = set()
    last_id = 0
    header = True
    classes = None
    while True:
        with session_scope() as session:
            j = get_job(session, job_id=job_id)
            classes = classes or job_classes(session, job_id=j.id)
            # rewind a little: ids of concurrent transactions can commit out of order
            new = [
                r
                for r in list_results(session, job_id=j.id, after_id=max(0, last_id - 1000))
                if r.id not in seen
            ]
            done = j.status in FINAL
        if new:
            _emit([_result_dict(r) for r in new], fmt, classes, header=header)
            header = False
            seen.update(r.id for r in new)
            last_id = max(last_id, *(r.id for r in new))
            sys.stdout.flush()
        elif done:
            return
        time.sleep(poll)


@click.command()
@click.argument("job")
def cancel(job: str) -> None:
    """Cancel a job: drop its queued messages, revoke its tasks; rows already written stay."""
    from producer.control import cancel_job

    c = cancel_job(job)
    click.echo(
        f"job {c.job_id} cancelled: {c.dropped} queued messages dropped, {c.revoked} tasks "
        f"revoked; the {c.rows} rows already written stay"
    )


@click.command()
@click.argument("job")
def close(job: str) -> None:
    """Close a streaming job left open; it is done once every image it received has a row."""
    from producer.control import close_stream

    click.echo(f"closed job {close_stream(job)}")
