"""``sortline refit``: a run's recipe trained again on every image of its split, then shipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from sortline.cli import cli
from tests.unit.test_training import make_imagefolder
from training.fit.refit import chosen_alpha, recipe
from training.model.checkpoint import read_metadata, read_unfamiliarity


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory) -> dict:
    from training.fit.run import RunConfig, train
    from training.fit.train import FinetuneParams, FrozenParams

    root = tmp_path_factory.mktemp("refit")
    data = make_imagefolder(root / "data", per_class=8)
    cfg = RunConfig(
        data=str(data), out=str(root / "run"), arch="tiny", pretrained="none", mode="finetune",
        frozen=FrozenParams(epochs=2), balance="sampler", robustness=False, register=False,
        finetune=FinetuneParams(epochs=2, batch_size=8, ema_decay=0.9, wise_alphas=(0.5, 1.0)),
        cache_dir=str(root / "cache"), version="1.0.0", seed=3,
    )  # fmt: skip
    return {"root": root, "data": data, "summary": train(cfg)}


def test_recipe_reads_back_the_run_config_and_the_chosen_wise_weight(finetune_run):
    meta = read_metadata(finetune_run["summary"]["checkpoint"])
    cfg = recipe(meta["training"])  # "seconds" and "ran_on" are not RunConfig fields
    assert (cfg.arch, cfg.mode, cfg.seed, cfg.finetune.epochs) == ("tiny", "finetune", 3, 2)
    assert cfg.finetune.wise_alphas == (0.5, 1.0) and cfg.finetune.ema_decay == 0.9
    sel = meta["metrics"]["wise_selection"]
    assert chosen_alpha(meta) == sel["alpha"]
    # an older checkpoint records only the table: the best score's weight
    table = {"alphas": {"0.5": {"score": 0.7}, "0.85": {"score": 0.9}, "1.0": {"score": 0.8}}}
    assert chosen_alpha({"metrics": {"wise_selection": table}}) == 0.85


def test_refit_trains_on_every_image_carries_the_run_over_and_ships(finetune_run, tmp_path):
    run = finetune_run
    src = run["summary"]["checkpoint"]
    src_meta = read_metadata(src)
    res = CliRunner().invoke(
        cli,
        ["refit", src, "--out", str(tmp_path / "refit"), "--version", "1.1.0", "--no-register",
         "--cache-dir", str(run["root"] / "cache")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "epoch   2  train loss" in res.output  # progress, one line per epoch
    ckpt = tmp_path / "refit" / "model.safetensors"
    meta = read_metadata(ckpt)
    n = {sp: src_meta["metrics"][sp]["n"] for sp in ("val", "test")}
    r = meta["refit"]
    assert r["of"] == "sortline-trashnet:1.0.0" and r["images"] == sum(r["splits"].values())
    assert r["splits"]["val"] == n["val"] and r["splits"]["test"] == n["test"]
    assert r["wise_alpha"] == chosen_alpha(src_meta)
    # what only held-out photos can choose is carried over; the run's figures are kept
    assert meta["temperature"] == src_meta["temperature"]
    assert meta["metrics"] == src_meta["metrics"]
    assert meta["unfamiliarity"]["shift_slope"] == src_meta["unfamiliarity"]["shift_slope"]
    assert meta["unfamiliarity"]["n_train"] == r["images"]
    assert 0 <= meta["unfamiliarity"]["train_flagged"] <= 0.5
    stats = read_unfamiliarity(ckpt)
    assert stats is not None and "det_w" in stats and "norm" in stats
    assert meta["manifest_sha256"] == src_meta["manifest_sha256"]
    hist = json.loads((tmp_path / "refit" / "histories.json").read_text())
    assert len(hist["history"]) == 2 and "val_acc" not in hist["history"][0]

    # refitting a refit is refused, in one line
    again = CliRunner().invoke(cli, ["refit", str(ckpt), "--out", str(tmp_path / "again")])
    assert again.exit_code != 0 and "already a refit" in again.output

    # shipping a refit: float16, nothing re-scored, labels checked against float32
    shipped = tmp_path / "shipped.safetensors"
    res = CliRunner().invoke(
        cli,
        ["ship", str(tmp_path / "refit"), "--version", "2.0.0", "--out", str(shipped),
         "--cache-dir", str(run["root"] / "cache")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = read_metadata(shipped)
    assert out["version"] == "2.0.0" and out["refit"] == meta["refit"]
    assert out["metrics"] == src_meta["metrics"] and out["temperature"] == meta["temperature"]
    assert out["half_parity"]["n"] == n["test"] and out["half_parity"]["labels_differ"] == 0
    half = read_unfamiliarity(shipped)
    assert half is not None
    assert np.allclose(half["norm"], stats["norm"])

    # scoring it on its own development data says, in one line, that those are training photos
    r = CliRunner().invoke(
        cli, ["evaluate", "--checkpoint", str(shipped), "--data", str(run["data"]), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert "is a refit of sortline-trashnet:1.0.0 on all" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["refit_of"] == "sortline-trashnet:1.0.0"
