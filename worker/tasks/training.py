"""Training tasks (queue ``training``): one Optuna trial per task.

Start workers with ``sortline worker -Q training`` (one process each; run as many as you
like, on any machine that reaches the broker, the study's database and the data folder).
The message is small JSON: the study name, a slot number, and the data folder, architecture
and mode the sender expects; the storage URL is never sent (workers read
``SORTLINE_TUNE_STORAGE`` or ``SORTLINE_DATABASE_URL``).
"""

from __future__ import annotations

import logging

from sortline.names import TRAINING_QUEUE, TRIAL_TASK
from training.config import get_tune_settings
from worker.app import app

log = logging.getLogger(__name__)

TASK = TRIAL_TASK
_LIMIT = get_tune_settings().tune_time_limit


@app.task(
    name=TASK,
    bind=True,
    acks_late=True,
    max_retries=None,  # "wait" answers retry until the study has its trials
    time_limit=_LIMIT,  # training takes longer than inference (SORTLINE_TASK_TIME_LIMIT)
    soft_time_limit=max(1, _LIMIT - min(60, max(1, _LIMIT // 5))),
)
def run_trial(self, message: dict) -> dict:
    """Run at most one trial of the study named in *message*; idempotent under redelivery."""
    from training.tune.runner import TuneError, run_one_trial

    if not isinstance(message, dict) or not isinstance(message.get("study"), str):
        log.error("rejected trial message (no study name): %r", message)
        return {"status": "rejected"}
    try:
        out = run_one_trial(
            message["study"],
            worker=self.request.hostname,
            task_id=self.request.id,
            expect={k: message.get(k) for k in ("data", "arch", "mode")},
        )
    except TuneError as e:
        log.error("study %s: %s", message["study"], e)
        return {"status": "rejected", "error": str(e)}
    if out["status"] == "wait":
        raise self.retry(countdown=out["retry_in"])
    return out


def enqueue_trials(study: str, *, data: str, arch: str, mode: str, n: int, first_slot: int = 0):
    """Send *n* trial tasks for *study* to the training queue; return their task ids."""
    import worker.app as worker_app  # looked up now: tests may point it at another broker

    ids = []
    for slot in range(first_slot, first_slot + n):
        msg = {"study": study, "slot": slot, "data": data, "arch": arch, "mode": mode}
        ids.append(worker_app.app.send_task(TASK, args=[msg], queue=TRAINING_QUEUE).id)
    return ids
