"""`sortline adapt`: the head is refitted on reviewed photos, the rest of the model is kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sortline.cli import cli
from tests.support.fixtures import tiny_run
from tests.unit.test_training import CLASSES, make_imagefolder
from training.data.dataset import DatasetError
from training.fit.adapt import bump_version


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A tiny frozen run on generated photos: the base model to adapt."""
    return tiny_run(tmp_path_factory.mktemp("adapt"))


def _reviewed(base: dict, folder: Path) -> Path:
    """Three photos of each of two classes filed as reviewed; the other class folders empty."""
    for c in CLASSES:
        (folder / c).mkdir(parents=True)
    for c, src in (("glass", "metal"), ("paper", "plastic")):  # relabelled by a person
        for i in range(3):
            shutil.copy(base["data"] / src / f"{src}{i}.jpg", folder / c / f"{src}{i}.jpg")
    return folder


def test_bump_version():
    assert bump_version("1.1.0", set()) == "1.1.1"
    assert bump_version("1.1.0", {"1.1.1", "1.1.2"}) == "1.1.3"
    assert bump_version("ft-D", set()) == "ft-D-adapt1"


def test_adapt_refits_the_head_only_and_records_provenance(base, tmp_path):
    from training.fit.adapt import adapt
    from training.fit.run import last_linear
    from training.model.checkpoint import load_checkpoint, read_metadata, read_unfamiliarity

    reviewed = _reviewed(base, tmp_path / "reviewed")
    s = adapt(reviewed, base["checkpoint"], tmp_path / "out", cache_dir=base["root"] / "cache",
              register=False)  # fmt: skip
    assert s["model"].endswith(":1.0.1") and s["reviewed"] == 6 and s["replay"] > 0
    old, _ = load_checkpoint(base["checkpoint"])
    new, meta = load_checkpoint(s["checkpoint"])
    head = [
        n for n, p in new.named_parameters() if any(p is q for q in last_linear(new).parameters())
    ]
    assert len(head) == 2
    old_state = old.state_dict()
    for name, v in new.state_dict().items():  # the backbone kept, the head refitted
        assert bool((v == old_state[name]).all()) == (name not in head), name
    prov = meta["adapted"]
    assert prov["base"] == "sortline-trashnet:1.0.0" and len(prov["base_sha256"]) == 64
    assert sorted((p["label"], p["file"]) for p in prov["photos"]) == sorted(
        (c, f"{c}/{src}{i}.jpg") for c, src in (("glass", "metal"), ("paper", "plastic"))
        for i in range(3)
    )  # fmt: skip
    assert meta["metrics"]["val"]["accuracy"] >= 0 and meta["temperature"] > 0
    stats = read_unfamiliarity(s["checkpoint"])
    assert stats is not None and np.isfinite(
        read_metadata(s["checkpoint"])["unfamiliarity"]["threshold"]
    )


def test_adapt_refuses_a_folder_that_is_not_a_class(base, tmp_path):
    reviewed = _reviewed(base, tmp_path / "reviewed")
    (reviewed / "bottles").mkdir()
    shutil.copy(base["data"] / "glass" / "glass3.jpg", reviewed / "bottles" / "x.jpg")
    from training.fit.adapt import adapt

    with pytest.raises(DatasetError, match="bottles are not classes of the base model"):
        adapt(reviewed, base["checkpoint"], tmp_path / "out", register=False)
    r = CliRunner().invoke(cli, ["adapt", "--reviewed", str(reviewed), "--base",
                                 str(base["checkpoint"])])  # fmt: skip
    assert r.exit_code == 1 and "bottles are not classes" in r.output
    assert "Traceback" not in r.output


def test_adapt_without_the_training_data_says_what_to_do(base, tmp_path):
    reviewed = _reviewed(base, tmp_path / "reviewed")
    other = make_imagefolder(tmp_path / "other", per_class=5, seed=4)
    r = CliRunner().invoke(cli, ["adapt", "--reviewed", str(reviewed), "--base",
                                 str(base["checkpoint"]), "--data", str(other)])  # fmt: skip
    assert r.exit_code == 1 and "pass --data with the dataset it was trained on" in r.output


def test_adapt_registers_a_candidate_and_activate_promotes_it(
    base, tmp_path, sqlite_url, monkeypatch
):
    monkeypatch.setenv("SORTLINE_DATABASE_URL", sqlite_url)
    reviewed = _reviewed(base, tmp_path / "reviewed")
    args = ["adapt", "--reviewed", str(reviewed), "--base", str(base["checkpoint"]),
            "--cache-dir", str(base["root"] / "cache")]  # fmt: skip
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "sortline-trashnet:1.0.1 from sortline-trashnet:1.0.0" in r.output
    assert (
        "`sortline models activate sortline-trashnet:1.0.1` makes it the active model" in r.output
    )
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--activate", "--force"])
    assert r.exit_code == 0, r.output  # 1.0.1 is taken: the next version
    assert "sortline-trashnet:1.0.2 is the active model" in r.output
    rows = {d["model"]: d["active"] for d in map(json.loads, CliRunner().invoke(
        cli, ["models", "--json"]).output.splitlines())}  # fmt: skip
    assert rows["sortline-trashnet:1.0.1"] is False and rows["sortline-trashnet:1.0.2"] is True
