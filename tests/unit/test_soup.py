"""Model soups: weights averaged across like runs, chosen on val, shippable."""

from __future__ import annotations

import json

import pytest
import torch

from tests.unit.test_training import make_imagefolder
from training.fit.soup import SoupError, average_states, make_soup


def _run(data, out, seed):
    from training.fit.run import RunConfig, train
    from training.fit.train import FrozenParams

    cfg = RunConfig(
        data=str(data),
        out=str(out),
        arch="tiny",
        pretrained="none",
        mode="frozen",
        frozen=FrozenParams(epochs=2),
        aug_views=0,
        seed=seed,
        register=False,
        robustness=False,
        version=f"s{seed}",
        cache_dir=str(out.parent / "cache"),
    )
    train(cfg)
    return out


def test_average_states_means_floats_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    avg = average_states([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and int(avg["n"]) == 5
    with pytest.raises(SoupError, match="differ"):
        average_states([a, {"w": torch.zeros(3), "n": torch.tensor(1)}])


def test_soup_of_two_runs_is_scored_on_val_and_ships(tmp_path, monkeypatch):
    from training.fit.ship import ship
    from training.model.checkpoint import load_checkpoint, read_metadata

    data = make_imagefolder(tmp_path / "data", per_class=8)
    runs = [_run(data, tmp_path / f"run{s}", s) for s in (0, 1)]
    res = make_soup(runs, tmp_path / "soup", cache_dir=str(tmp_path / "cache"))
    assert set(res["table"]) == {"run0", "run1", "soup"} and res["split"] == "val"
    assert res["choice"] in res["table"]
    for row in res["table"].values():
        assert row["score"] == pytest.approx((row["val_macro_f1"] + row["val_robust_macro_f1"]) / 2)
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["choice"] == res["choice"]

    soup, meta = load_checkpoint(tmp_path / "soup" / "model.safetensors")
    members = [load_checkpoint(r / "model.safetensors")[0].state_dict() for r in runs]
    for k, v in soup.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, (members[0][k] + members[1][k]) / 2, atol=1e-6)
    assert [m["run"] for m in meta["training"]["soup_of"]] == ["run0", "run1"]

    shipped = ship(
        tmp_path / "soup",
        version="t",
        out=tmp_path / "shipped.safetensors",
        cache_dir=str(tmp_path / "cache"),
        robustness=False,
    )
    assert shipped["metrics"]["test"]["n"] > 0
    assert read_metadata(tmp_path / "shipped.safetensors")["source_run"] == "soup"


def test_unlike_runs_are_refused(tmp_path):
    data = make_imagefolder(tmp_path / "data", per_class=8)
    other = make_imagefolder(tmp_path / "other", per_class=9, seed=3)
    a = _run(data, tmp_path / "a", 0)
    b = _run(other, tmp_path / "b", 0)
    with pytest.raises(SoupError, match="manifest_sha256"):
        make_soup([a, b], tmp_path / "soup", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(SoupError, match="at least two"):
        make_soup([a], tmp_path / "soup")
