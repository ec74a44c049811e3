"""What a study has done: trial counts, the trials table, the best trial, plots."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from db.config import mask_url

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state name, and ``errors`` (FAIL trials whose training raised)."""
    from collections import Counter

    trials = study.get_trials(deepcopy=False)
    c = Counter(t.state.name for t in trials)
    out = {s: c.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    out["errors"] = sum(1 for t in trials if t.state.name == "FAIL" and "error" in t.user_attrs)
    out["finished"] = out["COMPLETE"] + out["PRUNED"]
    return out


def _fmt_params(params: dict) -> str:
    def f(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={f(v)}" for k, v in params.items())


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per trial: number, state, value, params, duration, worker, retry and error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = None
        if t.datetime_start and t.datetime_complete:
            dur = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": dict(t.params),
                "duration_s": None if dur is None else round(dur, 2),
                "worker": t.user_attrs.get("worker", ""),
                "retry_of": t.system_attrs.get("failed_trial"),
                "error": t.user_attrs.get("error"),
                "start": t.datetime_start.isoformat() if t.datetime_start else None,
                "complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            }
        )
    return rows


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial, or None before the first one."""
    try:
        return study.best_trial
    except ValueError:
        return None


def status_text(study: optuna.Study, storage: str | None = None) -> str:
    """The trials table and the best trial, as printed by ``sortline tune status``."""
    rows = trial_rows(study)
    conf = study.user_attrs.get("config", {})
    c = state_counts(study)
    head = (
        f"study {study.study_name}: {conf.get('mode', '?')} {conf.get('arch', '?')} on "
        f"{conf.get('data', '?')}; {c['finished']}/{conf.get('trials', '?')} finished "
        f"({c['COMPLETE']} complete, {c['PRUNED']} pruned), {c['FAIL']} failed, "
        f"{c['RUNNING']} running, {c['WAITING']} waiting"
    )
    if storage:  # the URL optuna-dashboard opens
        head += f"\nstorage {mask_url(storage)}"
    lines = [head, f"{'#':>4}  {'state':<8} {'value':>8} {'seconds':>8}  {'worker':<28} params"]
    for r in rows:
        v = "" if r["value"] is None else f"{r['value']:.4f}"
        d = "" if r["duration_s"] is None else f"{r['duration_s']:.1f}"
        note = f"  (retry of #{r['retry_of']})" if r["retry_of"] is not None else ""
        if r["error"]:
            note += f"  error: {r['error'][:80]}"
        lines.append(
            f"{r['number']:>4}  {r['state']:<8} {v:>8} {d:>8}  {r['worker'][:28]:<28} "
            f"{_fmt_params(r['params'])}{note}"
        )
    b = best_trial(study)
    if b is None:
        lines.append("best: none yet")
    else:
        lines.append(f"best: trial {b.number} value {b.value:.4f} {_fmt_params(b.params)}")
    return "\n".join(lines)


def save_plots(study: optuna.Study, out: str | Path) -> list[Path]:
    """Optimisation history and parameter importances as PNG files in *out*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = [("optimization_history.png", ovm.plot_optimization_history)]
    if len(complete) >= 2:
        plots.append(("param_importances.png", ovm.plot_param_importances))
    for fname, fn in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = fn(study, target_name="validation macro-F1")
            except (ValueError, RuntimeError) as e:  # e.g. importances of a constant objective
                log.warning("no %s: %s", fname, e)
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(out / fname)
    return written


def list_studies(url: str | None = None) -> list[dict]:
    """Every study in the storage: name, metric, trials, best value, when it started."""
    import optuna

    from training.tune.storage import make_storage

    storage = make_storage(url)
    out = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=True):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        out.append(
            {
                "name": s.study_name,
                "metric": (study.metric_names or ["value"])[0],
                "direction": s.direction.name.lower(),
                "trials": s.n_trials,
                "best": None if s.best_trial is None else s.best_trial.value,
                "started": s.datetime_start.isoformat(" ", "seconds") if s.datetime_start else None,
            }
        )
    return out
