"""The train / evaluate / predict commands, run through the real console-script group."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from sortline.cli import cli
from tests.unit.test_training import CLASSES, make_imagefolder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_imagefolder(root / "data", per_class=8)
    out = root / "run"
    env = {"SORTLINE_CACHE_DIR": str(root / "cache")}
    r = CliRunner().invoke(
        cli,
        [
            "train",
            "--data",
            str(data),
            "--arch",
            "tiny",
            "--pretrained",
            "none",
            "--epochs",
            "2",
            "--resize",
            "44",
            "--crop",
            "36",
            "--out",
            str(out),
            "--no-register",
            "--no-robustness",
        ],
        env=env,
    )
    assert r.exit_code == 0, r.output
    return {"data": data, "out": out, "output": r.output}


def test_train_takes_the_input_size_and_refuses_a_crop_larger_than_the_resize(trained, tmp_path):
    from training.model.checkpoint import preprocess_spec, read_metadata

    spec = preprocess_spec(read_metadata(trained["out"] / "model.safetensors"))
    assert (spec.resize, spec.crop) == (44, 36)
    r = CliRunner().invoke(cli, ["train", "--data", str(trained["data"]), "--arch", "tiny",
                                 "--resize", "32", "--crop", "40", "--out", str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code != 0 and "--crop 40 is larger than --resize 32" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_train_shows_progress_per_epoch(trained):
    assert "epoch   1" in trained["output"] and "epoch   2" in trained["output"]
    assert "test: accuracy" in trained["output"]
    assert (trained["out"] / "model.safetensors").exists()
    assert " s on cpu (" in trained["output"]  # where it trained


def test_evaluate_json(trained):
    ckpt = trained["out"] / "model.safetensors"
    r = CliRunner().invoke(
        cli, ["evaluate", "--checkpoint", str(ckpt), "--data", str(trained["data"]), "--json"]
    )
    assert r.exit_code == 0, r.output
    m = json.loads(r.output.strip().splitlines()[-1])
    assert m["n"] == 6 * 8 + 2  # the corrupt file is skipped
    assert set(m["per_class"]) == set(CLASSES)
    assert {"precision", "recall", "f1"} <= set(m["per_class"]["glass"])
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    ci = m["intervals"]
    assert ci["level"] == 0.95 and ci["resamples"] == 1000
    assert ci["accuracy"][0] <= m["accuracy"] <= ci["accuracy"][1]
    assert ci["macro_f1"][0] <= m["macro_f1"] <= ci["macro_f1"][1]
    assert set(ci["per_class_f1"]) == set(CLASSES)
    r = CliRunner().invoke(
        cli, ["evaluate", "--checkpoint", str(ckpt), "--data", str(trained["data"])]
    )
    assert r.exit_code == 0 and "bootstrap 95% intervals (1000 resamples): accuracy" in r.output
    # the run's checkpoint carries a threshold; the review figures are consistent
    assert m["unfamiliar_threshold"] > 0 and 0 <= m["unfamiliar_rate"] <= m["needs_review_rate"]
    wrong = 1 - m["accuracy"]
    assert max(0.0, wrong - m["needs_review_rate"]) - 1e-9 <= m["confident_error_rate"] <= wrong
    assert (m["runtime"], m["precision"]) == ("onnx", "fp32")  # a CPU worker's; no calibration
    r = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(trained["data"]),
            "--json",
            "--runtime",
            "torch",
        ],
    )
    t = json.loads(r.output.strip().splitlines()[-1])
    assert (t["runtime"], t["precision"]) == ("torch", "fp32")
    assert abs(t["accuracy"] - m["accuracy"]) <= 1 / m["n"]  # the two runtimes agree
    r = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(trained["data"]),
            "--precision",
            "int8",
        ],
    )
    assert r.exit_code == 1 and "no int8 calibration" in r.output and "Traceback" not in r.output


def test_evaluate_threshold_setting_flags_everything(trained):
    ckpt = trained["out"] / "model.safetensors"
    r = CliRunner().invoke(
        cli,
        ["evaluate", "--checkpoint", str(ckpt), "--data", str(trained["data"]), "--json"],
        env={"SORTLINE_UNFAMILIAR_THRESHOLD": "-1"},
    )
    m = json.loads(r.output.strip().splitlines()[-1])
    assert m["unfamiliar_rate"] == 1 and m["needs_review_rate"] == 1
    assert m["confident_error_rate"] == 0


def test_predict_json_and_grid(trained, tmp_path):
    ckpt = trained["out"] / "model.safetensors"
    imgs = [
        str(trained["data"] / "glass" / "glass0.jpg"),
        str(trained["data"] / "trash" / "broken.jpg"),
    ]
    grid = tmp_path / "grid.png"
    r = CliRunner().invoke(
        cli, ["predict", *imgs, "--checkpoint", str(ckpt), "--json", "--grid", str(grid)]
    )
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.strip().splitlines()]
    assert lines[0]["label"] in CLASSES and 0 < lines[0]["confidence"] <= 1
    assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-5
    assert math.isfinite(lines[0]["unfamiliarity"]) and isinstance(lines[0]["unfamiliar"], bool)
    assert lines[0]["needs_review"] == (lines[0]["confidence"] < 0.6 or lines[0]["unfamiliar"])
    assert (lines[0]["runtime"], lines[0]["precision"]) == ("onnx", "fp32")
    assert lines[0]["status"] == "ok" and lines[0]["error"] is None
    assert lines[1]["status"] == "error" and lines[1]["error"] and lines[1]["label"] is None
    assert grid.exists()


def test_user_errors_have_no_traceback(trained, tmp_path):
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "nope.jpg")])
    assert r.exit_code != 0 and "no such file" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        cli,
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "missing.safetensors"),
            "--data",
            str(tmp_path),
        ],
    )
    assert r.exit_code != 0 and "does not exist" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_every_command_has_help(command):
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0 and len(r.output) > 100


def test_train_records_layer_decay_and_refuses_one_out_of_range(trained, tmp_path):
    from training.model.checkpoint import read_metadata

    base = ["train", "--data", str(trained["data"]), "--arch", "tiny", "--pretrained", "none",
            "--mode", "finetune", "--epochs", "1", "--wise-alpha", "1", "--no-register",
            "--no-robustness"]  # fmt: skip
    env = {"SORTLINE_CACHE_DIR": str(tmp_path / "cache")}
    r = CliRunner().invoke(cli, [*base, "--layer-decay", "0", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--layer-decay" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        cli, [*base, "--layer-decay", "0.7", "--out", str(tmp_path / "run")], env=env
    )
    assert r.exit_code == 0, r.output
    ft = read_metadata(tmp_path / "run" / "model.safetensors")["training"]["finetune"]
    assert ft["layer_decay"] == 0.7 and ft["drop_path"] == 0.0
