"""HTML reports of training runs: one run's folder, or several runs side by side (no torch here).

A run folder is what ``sortline train`` writes: ``metrics.json``, ``summary.json``,
``classification_report.txt``, ``history.csv``, ``curves.png``, ``confusion_matrix.png``,
``manifest.json``, ``robustness.json`` and ``model.safetensors`` (whose header holds the run's
configuration). Every one of them is optional here: what is missing is said on the page.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from sortline.errors import SortlineError
from training.reports import charts as viz

log = logging.getLogger(__name__)

CONFIG_KEYS = (
    "arch",
    "mode",
    "augment",
    "balance",
    "pretrained",
    "seed",
    "split_seed",
    "seconds",
    "ran_on",
)


class RunError(SortlineError, ValueError):
    """A folder that is not a training run; the message says why."""


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def load_run(run_dir: str | Path) -> dict:
    """What a run folder holds, as plain data; missing files give None."""
    d = Path(run_dir)
    if not d.is_dir():
        raise RunError(f"run folder not found: {d}")
    run: dict = {"dir": str(d), "name": d.name}
    run["metrics"] = _json(d / "metrics.json")
    run["summary"] = _json(d / "summary.json")
    run["manifest"] = _json(d / "manifest.json")
    run["robustness"] = _json(d / "robustness.json")
    if run["manifest"]:
        run["manifest"].pop("samples", None)
    run["meta"] = None
    if (d / "model.safetensors").exists():
        from training.model.checkpoint import CheckpointError, read_metadata

        try:
            run["meta"] = read_metadata(d / "model.safetensors")
        except CheckpointError as e:
            log.warning("%s", e)
    run["history"] = None
    if (d / "history.csv").exists():
        with open(d / "history.csv", newline="") as f:
            run["history"] = [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]
    rep = d / "classification_report.txt"
    run["report_text"] = rep.read_text() if rep.exists() else None
    run["pngs"] = {p.stem: p for p in sorted(d.glob("*.png"))}
    known_png = {"curves", "confusion_matrix"} & set(run["pngs"])
    if (
        not any(run[k] for k in ("metrics", "summary", "history", "meta", "manifest"))
        and not known_png
    ):
        raise RunError(
            f"{d} holds no run files (metrics.json, summary.json, manifest.json, history.csv, "
            "curves.png, model.safetensors); is it a `sortline train` run folder?"
        )
    return run


def _num(v: str):
    try:
        return float(v) if "." in v or "e" in v else int(v)
    except ValueError:
        return v


def _metrics(run: dict) -> dict:
    """The run's metrics: metrics.json, else the summary's, else the checkpoint's."""
    for src in (
        run["metrics"],
        (run["summary"] or {}).get("metrics"),
        (run["meta"] or {}).get("metrics"),
    ):
        if src:
            return src
    return {}


def _config(run: dict) -> dict:
    t = (run["meta"] or {}).get("training") or {}
    cfg = {k: t.get(k) for k in CONFIG_KEYS}
    mode = t.get("mode")
    if mode in ("frozen", "finetune") and isinstance(t.get(mode), dict):
        cfg["epochs"] = t[mode].get("epochs")
        if mode == "finetune":
            cfg["augment"] = cfg["augment"] or t[mode].get("augment")
    if run["summary"] and cfg["seconds"] is None:
        cfg["seconds"] = run["summary"].get("seconds")
    return cfg


def _split_rows(m: dict) -> list[tuple]:
    rows = []
    for split in ("val", "test", "test_flip_tta"):
        s = m.get(split)
        if isinstance(s, dict) and "accuracy" in s:
            rows.append((split, s.get("n"), s.get("accuracy"), s.get("macro_f1"), s.get("ece")))
    rob = (m.get("test_robustness") or {}).get("mean_corrupted")
    if rob:
        rows.append(
            ("test, corrupted (mean)", None, rob.get("accuracy"), rob.get("macro_f1"), None)
        )
    return rows


def _confusion_png(run: dict, out: Path, prefix: str = "") -> Path | None:
    """The run's test confusion matrix PNG: rendered from metrics.json, else the run's own."""
    m = _metrics(run)
    test = m.get("test") or {}
    classes = list(test.get("per_class") or (run["meta"] or {}).get("classes") or [])
    if test.get("confusion") and classes:
        return viz.confusion_png(
            test["confusion"],
            classes,
            out / f"{prefix}confusion_matrix.png",
            title=f"{run['name']}: test (acc {test.get('accuracy', float('nan')):.3f})",
        )
    src = run["pngs"].get("confusion_matrix")
    if src:
        dst = out / f"{prefix}confusion_matrix.png"
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return dst
    return None


def _curves_png(run: dict, out: Path) -> Path | None:
    src = run["pngs"].get("curves")
    if src:
        dst = out / "curves.png"
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return dst
    return viz.curves_png(run["history"], out / "curves.png")


def run_report(run_dir: str | Path, out: str | Path) -> Path:
    """Write ``run.html`` (and its PNGs) for one run folder into *out*; return the page's path."""
    run = load_run(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m, cfg = _metrics(run), _config(run)
    page = viz.Page(f"Run {run['name']}", run["dir"])
    page.h2("Configuration")
    if run["meta"]:
        page.table(list(cfg), [list(cfg.values())], left=len(cfg))
        page.p(
            f"model {run['meta'].get('name')}:{run['meta'].get('version')}, "
            f"temperature {viz.fmt(run['meta'].get('temperature'))}"
        )
    else:
        page.p("No model.safetensors: the configuration is unknown.", "warn")

    page.h2("Metrics")
    rows = _split_rows(m)
    if rows:
        page.table(["split", "n", "accuracy", "macro-F1", "ECE"], rows)
        ci = (m.get("test") or {}).get("intervals")
        if ci:
            page.p(
                f"Test, bootstrap {ci['level']:.0%} intervals ({ci['resamples']} resamples): "
                f"accuracy {ci['accuracy']}, macro-F1 {ci['macro_f1']}; F1 per class: "
                + ", ".join(f"{c} {v}" for c, v in ci["per_class_f1"].items())
            )
    else:
        page.p("No metrics.json or summary.json.", "warn")
    cal = m.get("calibration")
    if cal:
        page.p(
            f"Temperature {viz.fmt(cal.get('temperature'))} fitted on {cal.get('split')}: "
            f"ECE {viz.fmt(cal.get('ece_before'), 4)} -> {viz.fmt(cal.get('ece_after'), 4)}, "
            f"NLL {viz.fmt(cal.get('nll_before'), 4)} -> {viz.fmt(cal.get('nll_after'), 4)}"
        )
    per = (m.get("test") or {}).get("per_class")
    if per:
        page.table(
            ["class (test)", "precision", "recall", "f1", "support"],
            [
                (c, v.get("precision"), v.get("recall"), v.get("f1"), v.get("support"))
                for c, v in per.items()
            ],
        )

    page.h2("Curves and confusion matrix")
    figs = [
        (p, cap)
        for p, cap in (
            (_curves_png(run, out), "training curves"),
            (_confusion_png(run, out), "test confusion matrix"),
        )
        if p
    ]
    for png, caption in figs:
        page.figure(png, caption)
    if not figs:
        page.p("No curves.png, history.csv or confusion matrix in the run folder.", "warn")
    if run["report_text"]:
        page.pre(run["report_text"])

    rob = run["robustness"] or m.get("test_robustness")
    if rob and isinstance(rob.get("per_corruption"), dict):
        page.h2("Robustness (test split, corrupted copies)")
        page.table(
            ["corruption", "accuracy", "macro-F1"],
            [
                (k, v.get("accuracy"), v.get("macro_f1"))
                for k, v in rob["per_corruption"].items()
                if isinstance(v, dict)
            ],
        )

    mf = run["manifest"]
    if mf and isinstance(mf.get("counts"), dict):
        page.h2("Data split")
        classes = mf.get("classes") or sorted({c for v in mf["counts"].values() for c in v})
        page.table(
            ["split", *classes, "total"],
            [
                (sp, *(v.get(c, 0) for c in classes), sum(v.values()))
                for sp, v in mf["counts"].items()
            ],
        )
        page.p(
            f"{mf.get('duplicate_groups', '?')} near-duplicate groups kept on one side; "
            f"{len(mf.get('skipped') or [])} unreadable files skipped; manifest sha256 "
            f"{mf.get('manifest_sha256', '?')[:16]}"
        )
    return page.write(out / "run.html")


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``compare.html``: a table of the runs and their confusion matrices side by side."""
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):  # same folder names under different parents
        for r in runs:
            r["name"] = f"{Path(r['dir']).parent.name}/{r['name']}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = [
        "run",
        "arch",
        "mode",
        "augment",
        "balance",
        "epochs",
        "val acc",
        "test acc",
        "test macro-F1",
        "test ECE",
        "corrupted acc",
        "seconds",
        "split",
    ]
    rows, scores = [], {}
    for r in runs:
        m, c = _metrics(r), _config(r)
        val, test = m.get("val") or {}, m.get("test") or {}
        rob = (m.get("test_robustness") or r["robustness"] or {}).get("mean_corrupted") or {}
        rows.append(
            (
                r["name"],
                c["arch"],
                c["mode"],
                c["augment"],
                c["balance"],
                c.get("epochs"),
                val.get("accuracy"),
                test.get("accuracy"),
                test.get("macro_f1"),
                test.get("ece"),
                rob.get("accuracy"),
                c["seconds"],
                ((r["manifest"] or {}).get("manifest_sha256") or "-")[:8],
            )
        )
        if test.get("accuracy") is not None:
            scores[r["name"]] = test["accuracy"]
    page = viz.Page(f"Comparison of {len(runs)} runs", ", ".join(str(d) for d in run_dirs))
    page.h2("Runs")
    page.table(header, rows, left=5)
    if scores:
        best = max(scores, key=scores.get)
        page.p(
            f"Best test accuracy: {best} ({scores[best]:.3f}). Compare runs with the same "
            "split (the last column: the first digits of the split manifest's sha256)."
        )
        chart = viz.bar_chart(
            scores, out / "test_accuracy.png", title="test accuracy per run", ylabel="accuracy"
        )
        page.figure(chart, "test accuracy per run")
    shas = {r["name"]: (r["manifest"] or {}).get("manifest_sha256") for r in runs}
    if len({s for s in shas.values() if s}) > 1:
        page.p(
            "The runs used different splits (manifest sha256 differ): their test figures are "
            "not directly comparable.",
            "warn",
        )
    per = {r["name"]: (_metrics(r).get("test") or {}).get("per_class") or {} for r in runs}
    classes = list(dict.fromkeys(c for v in per.values() for c in v))
    if classes:
        page.h2("Per-class F1 (test split)")
        page.table(
            ["class", *per],
            [(c, *((per[n].get(c) or {}).get("f1") for n in per)) for c in classes],
        )
    page.h2("Confusion matrices (test split)")
    figs = []
    for i, r in enumerate(runs):
        png = _confusion_png(r, out, prefix=f"run{i}_")
        if png:
            figs.append((png, r["name"]))
        else:
            page.p(f"{r['name']}: no confusion matrix", "warn")
    if figs:
        page.figures(figs)
    return page.write(out / "compare.html")
