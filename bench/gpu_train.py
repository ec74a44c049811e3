"""The model-2.0 recipe on one GPU under a time budget: teachers, then one distilled student.

Run through ``bench/gpu_train.sh OUT_DIR [BUDGET_SECONDS] [--tiny] [--data DIR]``. Each stage
is a full training run (``training.fit.run.train``: probe, fine-tune, WiSE-FT on val,
calibration, test once) written as a run folder under OUT_DIR:

1. three teachers, LP-FT with ``robust_mix`` (run D's recipe, longer): Lite2 at 288 px seed 0,
   Lite2 at 260 px seed 1, Lite1 at 240 px seed 2;
2. one Lite2 student at 260 px (the shipped model's size and cost), fine-tuned on the teachers'
   averaged calibrated probabilities on its own augmented views, with the robustness check.

The budget is shared out in advance (teachers 55%, student 40%, 5% spare). Epochs of a stage
are fitted to its share from the epoch and evaluation times of the stage before it, and no
epoch is started that would end past the share. A stage that cannot fit its minimum is skipped;
the student distils from the teachers that finished. Progress goes to stdout, figures per
stage to ``OUT_DIR/gpu_train.json``. ``--tiny`` runs the same stages with the tiny network on a
few epochs (the CPU smoke test in tests/unit/test_gpu_train.py).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

RECIPE = {  # run D (models/MODEL_CARD.md) with longer schedules
    "mode": "finetune",
    "augment": "robust_mix",
    "balance": "sampler",
    "pretrained": "auto",
}
WISE_ALPHAS = (0.5, 0.7, 0.85, 1.0)


@dataclass
class Stage:
    """One run of the plan: its folder name, architecture, input size, seed and epochs."""

    name: str
    arch: str
    seed: int
    epochs: int
    resize: int | None = None
    crop: int | None = None
    student: bool = False
    min_epochs: int = 3
    result: dict = field(default_factory=dict)


def plan(tiny: bool) -> list[Stage]:
    """The stages of the full recipe, or of the tiny smoke run."""
    if tiny:
        return [
            Stage("teacher-tiny-32-s0", "tiny", 0, 2, 40, 32, min_epochs=1),
            Stage("teacher-tiny-40-s1", "tiny", 1, 2, 48, 40, min_epochs=1),
            Stage("student-tiny-32", "tiny", 2, 2, 40, 32, student=True, min_epochs=1),
        ]
    return [
        Stage("teacher-lite2-288-s0", "efficientnet_lite2", 0, 30, 324, 288),
        Stage("teacher-lite2-260-s1", "efficientnet_lite2", 1, 30),
        Stage("teacher-lite1-240-s2", "efficientnet_lite1", 2, 30),
        Stage("student-lite2-260", "efficientnet_lite2", 3, 40, student=True),
    ]


def run_config(stage: Stage, args, teachers: list[str]):
    """The RunConfig of *stage*."""
    from training.config import get_training_settings
    from training.fit.run import RunConfig
    from training.fit.train import FinetuneParams, FrozenParams

    tiny = stage.arch == "tiny"
    return RunConfig(
        data=str(args.data),
        out=str(args.out / stage.name),
        arch=stage.arch,
        resize=stage.resize,
        crop=stage.crop,
        seed=stage.seed,
        **{**RECIPE, "pretrained": "none" if tiny else RECIPE["pretrained"]},
        frozen=FrozenParams(epochs=2 if tiny else 15),
        finetune=FinetuneParams(
            epochs=stage.epochs,
            batch_size=8 if tiny else 32,
            lr=1e-3,
            backbone_lr=4e-4,
            ema_decay=0.9 if tiny else 0.99,
            wise_alphas=(0.85, 1.0) if tiny else WISE_ALPHAS,
            loader_workers=args.workers,
        ),
        teachers=tuple(teachers) if stage.student else (),
        robustness=stage.student,
        register=False,
        version=stage.name,
        device=args.device,
        cache_dir=str(get_training_settings().cache_dir),
    )


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_stage(stage: Stage, args, teachers: list[str], end: float, timing: dict) -> bool:
    """Train *stage* so that it ends by *end* (epochs fitted to measured times); False if skipped."""
    from training.fit.run import train

    overhead = timing.get("overhead", 0.3 * (end - time.time()))
    if stage.student:
        overhead *= 2  # the robustness check on test comes on top
    if "epoch" in timing:
        fit = math.floor((end - time.time() - overhead) / timing["epoch"])
        stage.epochs = min(stage.epochs, fit)
    if stage.epochs < stage.min_epochs:
        say(f"{stage.name}: skipped, {end - time.time():.0f} s left cannot fit its epochs")
        return False
    cfg = run_config(stage, args, teachers)
    say(
        f"{stage.name}: {stage.arch} at {cfg.crop} px, {stage.epochs} epochs, "
        f"{len(cfg.teachers)} teacher(s), until {time.strftime('%H:%M:%S', time.localtime(end))}"
    )

    def progress(rec: dict) -> None:
        say(
            f"  {stage.name} epoch {rec['epoch']:>2}: train loss {rec['train_loss']:.4f}  "
            f"val acc {rec['val_acc']:.4f}  val macro-F1 {rec['val_macro_f1']:.4f}  "
            f"({rec['seconds']:.1f} s)"
        )

    t0 = time.time()
    summary = train(cfg, on_epoch=progress, deadline=end - overhead)
    seconds = time.time() - t0
    history = _history(Path(cfg.out))
    epoch_s = sum(r["seconds"] for r in history) / max(1, len(history))
    timing.update(epoch=epoch_s, overhead=seconds - epoch_s * len(history))
    m = summary["metrics"]
    stage.result = {
        "run": cfg.out,
        "arch": stage.arch,
        "crop": cfg.crop,
        "seed": stage.seed,
        "teachers": list(cfg.teachers),
        "epochs_planned": stage.epochs,
        "epochs_run": len(history),
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(epoch_s, 2),
        "ran_on": summary["ran_on"],
        "wise_alpha": m.get("wise_selection", {}).get("alpha"),
        "val": {k: m["val"][k] for k in ("accuracy", "macro_f1")},
        "test": {k: m["test"][k] for k in ("accuracy", "macro_f1", "intervals", "ece")},
        "temperature": m["calibration"]["temperature"],
    }
    if "test_robustness" in m:
        stage.result["test_robustness_mean"] = m["test_robustness"]["mean_corrupted"]
    t = stage.result["test"]
    say(
        f"{stage.name}: done in {seconds:.0f} s on {summary['ran_on']}; val macro-F1 "
        f"{stage.result['val']['macro_f1']:.4f}; test acc {t['accuracy']:.4f} "
        f"{t['intervals']['accuracy']}, macro-F1 {t['macro_f1']:.4f} {t['intervals']['macro_f1']}"
    )
    return True


def _history(run: Path) -> list[dict]:
    import csv

    with open(run / "history.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path, help="output folder: one run folder per stage")
    ap.add_argument("--budget", type=float, default=840, help="seconds for everything [840]")
    ap.add_argument("--data", type=Path, default=Path("/work/shared/trashnet"))
    ap.add_argument("--tiny", action="store_true", help="the tiny network, a few epochs")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers [auto]")
    args = ap.parse_args()
    start = time.time()
    deadline = start + 0.95 * args.budget
    if not args.data.is_dir():
        raise SystemExit(f"no dataset at {args.data}; give --data DIR (an ImageFolder)")
    args.out.mkdir(parents=True, exist_ok=True)
    stages = plan(args.tiny)
    teachers_share = 0.55 * args.budget / sum(not s.student for s in stages)
    say(f"budget {args.budget:.0f} s, {len(stages)} stages, data {args.data} -> {args.out}")
    finished: list[str] = []
    timing: dict = {}
    for stage in stages:
        end = deadline if stage.student else min(deadline, time.time() + teachers_share)
        if run_stage(stage, args, finished, end, timing) and not stage.student:
            finished.append(stage.result["run"])
    report = {
        "budget_s": args.budget,
        "seconds": round(time.time() - start, 1),
        "stages": {s.name: s.result or "skipped" for s in stages},
    }
    (args.out / "gpu_train.json").write_text(json.dumps(report, indent=1))
    say(
        f"all stages done in {report['seconds']:.0f} s of {args.budget:.0f}; {args.out}/gpu_train.json"
    )


if __name__ == "__main__":
    main()
