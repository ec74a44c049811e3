"""The sortline Celery app with faults injected, for worker processes of the fault tests.

Start a worker with ``-A tests.support.faulty_app``. An image reference containing
``POISON-RAISE`` makes the task raise every time; one containing ``POISON-CRASH`` kills the
pool process running it (as a segfault or the OOM killer would); one containing
``POISON-HANG`` blocks the soft time limit's signal and sleeps, so that only the hard time limit
ends it. Each such attempt appends a line to ``$SORTLINE_TEST_ATTEMPTS``. With
``$SORTLINE_TEST_DELAY_S`` set, every message first sleeps that long (a slow worker).
"""

from __future__ import annotations

import os
import signal
import time

import worker.tasks.inference as inference
from worker.app import app

__all__ = ["app"]

_classify = inference.classify_message


def _note(kind: str, msg) -> None:
    path = os.environ.get("SORTLINE_TEST_ATTEMPTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {msg.job_id} {os.getpid()}\n")


def faulty_classify_message(msg, *, worker):
    time.sleep(float(os.environ.get("SORTLINE_TEST_DELAY_S", "0")))
    refs = " ".join(it.ref for it in msg.items)
    if "POISON-CRASH" in refs:
        _note("crash", msg)
        os.kill(os.getpid(), signal.SIGKILL)
    if "POISON-HANG" in refs:
        _note("hang", msg)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # billiard's soft limit
        time.sleep(3600)
    if "POISON-RAISE" in refs:
        _note("raise", msg)
        raise RuntimeError("poisoned message (injected fault)")
    return _classify(msg, worker=worker)


inference.classify_message = faulty_classify_message
