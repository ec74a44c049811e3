"""`sortline adapt`: the whole network fine-tuned on reviewed photos and a replay (default), or
the head alone refitted with the rest of the model kept."""

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
from training.fit.adapt import AdaptParams, bump_version


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
              params=AdaptParams(mode="head"), register=False)  # fmt: skip
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
    assert prov["mode"] == "head" and prov["l2"] == 1e-3
    assert sorted((p["label"], p["file"]) for p in prov["photos"]) == sorted(
        (c, f"{c}/{src}{i}.jpg") for c, src in (("glass", "metal"), ("paper", "plastic"))
        for i in range(3)
    )  # fmt: skip
    assert meta["metrics"]["val"]["accuracy"] >= 0 and meta["temperature"] > 0
    stats = read_unfamiliarity(s["checkpoint"])
    assert stats is not None and np.isfinite(
        read_metadata(s["checkpoint"])["unfamiliarity"]["threshold"]
    )


def test_the_training_crop_is_the_setting_at_most_the_models_input():
    from training.fit.adapt import train_crop
    from training.model.preprocess import PreprocessSpec

    lite2 = PreprocessSpec(resize=292, crop=260)
    assert train_crop(AdaptParams(), lite2) == 192  # the default: under half a step's time
    assert train_crop(AdaptParams(crop=None), lite2) == 260
    assert train_crop(AdaptParams(crop=320), lite2) == 260  # never above the model's input


def test_adapt_finetunes_the_backbone_and_keeps_batchnorm_statistics(base, tmp_path):
    from training.fit.adapt import adapt
    from training.model.checkpoint import load_checkpoint, preprocess_spec, read_metadata

    reviewed = _reviewed(base, tmp_path / "reviewed")
    s = adapt(reviewed, base["checkpoint"], tmp_path / "out", cache_dir=base["root"] / "cache",
              params=AdaptParams(steps=20), register=False)  # fmt: skip
    assert s["mode"] == "finetune" and s["reviewed"] == 6 and s["model"].endswith(":1.0.1")
    old, _ = load_checkpoint(base["checkpoint"])
    new, meta = load_checkpoint(s["checkpoint"])
    old_state = old.state_dict()
    changed = {n for n, v in new.state_dict().items() if not bool((v == old_state[n]).all())}
    assert any(n.startswith("features.") for n in changed)  # the backbone too, not the head only
    assert any(n.startswith("classifier.") for n in changed)
    prov = meta["adapted"]
    assert prov["mode"] == "finetune" and prov["steps"] == 20 and len(prov["photos"]) == 6
    d = AdaptParams()
    assert (prov["wise"], prov["site_look"]) == (d.wise, d.site_look)
    assert prov["crop"] == min(d.crop, preprocess_spec(meta).crop)  # the size it trained at
    assert prov["full_steps"] == min(d.full_steps, 20)  # of those, at the model's own size
    assert prov["frozen"] == d.frozen  # first layers kept as the base's
    assert prov["anchor"] == d.anchor  # feature anchor on the replayed photos
    assert set(prov["look"]) == {"gain", "zoom", "blur", "floors"}  # what SiteLook estimated
    # a new backbone: the base's shift detector is dropped, the Gaussians refitted
    assert read_metadata(s["checkpoint"])["unfamiliarity"]["method"] == "mahalanobis"
    assert meta["temperature"] > 0 and 0 <= meta["metrics"]["val"]["accuracy"] <= 1


def test_finetune_keeps_batchnorm_statistics_and_learns_the_photos():
    import torch

    from training.fit.adapt import finetune
    from training.model.factory import TinyNet
    from training.model.preprocess import PreprocessSpec

    torch.manual_seed(0)
    model = TinyNet(2)
    model.features.insert(1, torch.nn.BatchNorm2d(8))
    model.features[1].running_mean.fill_(0.5)
    before = {n: b.clone() for n, b in model.named_buffers()}
    rng = np.random.default_rng(0)
    # class 0 dark photos, class 1 bright ones; reviewed and replayed alike
    imgs = [rng.integers(0, 80, (40, 40, 3), np.uint8) for _ in range(8)] + [
        rng.integers(170, 256, (40, 40, 3), np.uint8) for _ in range(8)
    ]
    ys = np.array([0] * 8 + [1] * 8)
    spec = PreprocessSpec(resize=40, crop=32)
    losses = finetune(model, spec, (imgs, ys), (imgs, ys), AdaptParams(steps=60, lr=1e-2,
                                                                       head_lr=1e-2))  # fmt: skip
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10])
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_finetune_keeps_its_frozen_first_layers_as_the_base_s():
    import torch

    from training.fit.adapt import finetune
    from training.model.factory import TinyNet
    from training.model.preprocess import PreprocessSpec

    torch.manual_seed(0)
    model = TinyNet(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), np.uint8) for _ in range(8)]
    ys = np.array([0, 1] * 4)
    finetune(model, PreprocessSpec(resize=40, crop=32), (imgs, ys), (imgs, ys),
             AdaptParams(steps=5, lr=1e-2, site_look=0.0, frozen=1))  # fmt: skip
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # layer 0 (the first conv) kept; the second conv and the classifier trained
    assert changed == {"features.2.weight", "features.2.bias", "classifier.weight",
                       "classifier.bias"}  # fmt: skip
    assert all(p.requires_grad for p in model.parameters())  # trainable again afterwards


def test_wise_blend_interpolates_floating_point_entries_only():
    import torch

    from training.fit.train import wise_blend

    base = {"w": torch.zeros(2), "n": torch.tensor(3)}
    tuned = {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor(5)}
    out = wise_blend(base, tuned, 0.25)
    assert out["w"].tolist() == [0.5, 1.0] and int(out["n"]) == 5


def test_wise_blend_graded_from_the_stem_to_the_head():
    import torch

    from training.fit.train import wise_blend

    keys = ["stem", "n", "middle", "head"]  # in the state dict's order; "n" is an integer
    base = {k: torch.tensor(0 if k == "n" else 0.0) for k in keys}
    tuned = {k: torch.tensor(7 if k == "n" else 1.0) for k in keys}
    out = wise_blend(base, tuned, (1.0, 0.5))
    assert [round(float(out[k]), 3) for k in keys] == [1.0, 7.0, 0.75, 0.5]


def test_adapt_with_no_reviewed_photos_says_what_to_do(base, tmp_path):
    reviewed = tmp_path / "reviewed"
    for c in CLASSES:
        (reviewed / c).mkdir(parents=True)
    r = CliRunner().invoke(cli, ["adapt", "--reviewed", str(reviewed), "--base",
                                 str(base["checkpoint"])])  # fmt: skip
    assert r.exit_code == 1 and "holds no readable images" in r.output, r.output
    assert "Traceback" not in r.output


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
            "--cache-dir", str(base["root"] / "cache"), "--steps", "20"]  # fmt: skip
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "sortline-trashnet:1.0.1 from sortline-trashnet:1.0.0 (finetune)" in r.output
    assert "adapt: step 20/20, loss" in r.output  # progress of the fine-tune, on stderr
    assert (
        "`sortline models activate sortline-trashnet:1.0.1` makes it the active model" in r.output
    )
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b"), "--activate", "--force"])
    assert r.exit_code == 0, r.output  # 1.0.1 is taken: the next version
    assert "sortline-trashnet:1.0.2 is the active model" in r.output
    rows = {d["model"]: d["active"] for d in map(json.loads, CliRunner().invoke(
        cli, ["models", "--json"]).output.splitlines())}  # fmt: skip
    assert rows["sortline-trashnet:1.0.1"] is False and rows["sortline-trashnet:1.0.2"] is True


def _textured(rng, size: int, tint) -> np.ndarray:
    """Fine random texture in one tint (uint8 HWC)."""
    return (rng.random((size, size, 1)) * 0.6 + 0.4) * np.asarray(tint, np.float32)


def test_site_look_takes_the_site_s_colours_floor_and_blur():
    from PIL import Image, ImageFilter

    from training.data.augment import SiteLook

    rng = np.random.default_rng(0)
    site = []  # dim bluish floor, a red object, all out of focus
    for _ in range(8):
        a = _textured(rng, 96, (40, 60, 140))
        a[36:60, 36:60] = (170, 50, 50)
        im = Image.fromarray(a.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2.0))
        site.append(np.asarray(im))
    board = []  # sharp, finely textured green objects on a white board
    for _ in range(8):
        b = np.full((96, 96, 3), 235, np.uint8)
        b[24:72, 24:72] = _textured(rng, 48, (40, 200, 40)).astype(np.uint8)
        board.append(b)
    look = SiteLook.fit(site, board)
    assert look.blur >= 1.0  # the site's photos hold less fine detail than the board's
    assert 0.3 <= look.zoom <= 0.7  # its objects fill a quarter of the frame, not half
    out = look.apply(board[0], np.random.default_rng(1))
    assert out.shape == board[0].shape and out.dtype == np.uint8
    site_mean = np.mean([a.reshape(-1, 3).mean(0) for a in site], axis=0)
    assert np.abs(out.reshape(-1, 3).mean(0) - site_mean).max() < 20  # not the white board's
    # the board is gone: the corners are the site's floor (bluish), not white
    corners = np.concatenate([out[:6, :6].reshape(-1, 3), out[-6:, -6:].reshape(-1, 3)])
    assert corners.mean() < 150 and corners[:, 2].mean() > corners[:, 0].mean()


def test_site_look_floor_patches_leave_out_corners_with_an_object():
    from training.data.augment import SiteLook

    rng = np.random.default_rng(0)
    site = []  # a grey floor; the red object inside a corner patch in three photos of four
    for i in range(12):
        a = _textured(rng, 96, (90, 90, 90))
        top, left = ((13, 13), (63, 63), (13, 63), (38, 38))[i % 4]
        a[top : top + 20, left : left + 20] = (150, 60, 50)
        site.append(a.astype(np.uint8))
    board = []
    for _ in range(8):
        b = np.full((96, 96, 3), 235, np.uint8)
        b[24:72, 24:72] = _textured(rng, 48, (40, 200, 40)).astype(np.uint8)
        board.append(b)
    look = SiteLook.fit(site, board)
    # a patch with the object in it would lay a piece of it under every replayed photo
    reddish = [f for f in look.floors if (f[..., 0].astype(int) - f[..., 2]).mean() > 20]
    assert not reddish and len(look.floors) >= 12
    assert 0.3 <= look.zoom <= 0.7


def test_finetune_replays_photos_in_the_site_s_look():
    import torch

    from training.fit.adapt import finetune
    from training.model.factory import TinyNet
    from training.model.preprocess import PreprocessSpec

    seen = []

    def look(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        seen.append(a.shape)
        return 255 - a

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), np.uint8) for _ in range(8)]
    ys = np.array([0, 1] * 4)
    torch.manual_seed(0)
    finetune(TinyNet(2), PreprocessSpec(resize=40, crop=32), (imgs, ys), (imgs, ys),
             AdaptParams(steps=10, site_look=0.5), look=look)  # fmt: skip
    assert 10 <= len(seen) <= 70  # about half of the 80 replayed photos, none of the reviewed
    seen.clear()
    finetune(TinyNet(2), PreprocessSpec(resize=40, crop=32), (imgs, ys), (imgs, ys),
             AdaptParams(steps=10, site_look=0.0), look=look)  # fmt: skip
    assert not seen


def test_finetune_anchor_keeps_the_replayed_photos_features_near_the_base_s():
    import copy

    import torch

    from training.data.features import extract
    from training.fit.adapt import finetune
    from training.model.factory import TinyNet
    from training.model.preprocess import PreprocessSpec

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), np.uint8) for _ in range(8)]
    ys, spec = np.array([0, 1] * 4), PreprocessSpec(resize=40, crop=32)
    torch.manual_seed(0)
    base = TinyNet(2)
    targets = extract(base, imgs, spec)
    drift = {}
    for anchor in (0.0, 100.0):
        model = copy.deepcopy(base)
        params = AdaptParams(steps=30, crop=32, full_steps=30, site_look=0.0, frozen=0,
                             lr=1e-2, head_lr=1e-2, anchor=anchor)  # fmt: skip
        finetune(model, spec, (imgs, ys), (imgs, ys), params, replay_features=targets)
        drift[anchor] = float(((extract(model, imgs, spec) - targets) ** 2).sum(1).mean())
    assert drift[0.0] > 0
    assert drift[100.0] < 0.5 * drift[0.0]


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_finetune_runs_any_number_of_steps(steps):
    from training.fit.adapt import finetune
    from training.model.factory import TinyNet
    from training.model.preprocess import PreprocessSpec

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), np.uint8) for _ in range(8)]
    ys, spec = np.array([0, 1] * 4), PreprocessSpec(resize=40, crop=32)
    params = AdaptParams(steps=steps, crop=32, site_look=0.0, frozen=0)
    losses = finetune(TinyNet(2), spec, (imgs, ys), (imgs, ys), params)
    assert len(losses) == steps and all(np.isfinite(losses))


def test_finetune_trains_its_last_full_steps_at_the_models_own_size():
    import torch

    from training.fit.adapt import finetune
    from training.model.factory import TinyNet
    from training.model.preprocess import PreprocessSpec

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), np.uint8) for _ in range(8)]
    ys = np.array([0, 1] * 4)
    model, sizes = TinyNet(2), []
    model.features.register_forward_pre_hook(
        lambda m, args: sizes.append(tuple(args[0].shape[-2:]))
    )
    torch.manual_seed(0)
    finetune(model, PreprocessSpec(resize=40, crop=32), (imgs, ys), (imgs, ys),
             AdaptParams(steps=10, crop=16, full_steps=3, site_look=0.0))  # fmt: skip
    assert sizes == [(16, 16)] * 7 + [(32, 32)] * 3


def test_plan_position_follows_steps_or_time_whichever_is_further():
    from training.fit.adapt import plan_position

    assert plan_position(10, 999.0, 600, None) == 10  # no budget: the steps alone
    assert plan_position(10, 1.0, 600, 100.0) == 10  # ahead of time: the steps
    assert plan_position(10, 50.0, 600, 100.0) == 300  # behind: half the time is half the plan
    assert plan_position(10, 100.0, 600, 100.0) >= 600  # time spent: the plan ends


def test_finetune_stops_when_its_seconds_are_spent_and_ends_at_full_size(monkeypatch):
    import torch

    from training.fit import adapt as adapt_mod
    from training.model.factory import TinyNet
    from training.model.preprocess import PreprocessSpec

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 40, 3), np.uint8) for _ in range(8)]
    ys = np.array([0, 1] * 4)
    clock = iter(range(0, 10_000, 10))  # every reading of the clock: 10 s later
    monkeypatch.setattr(adapt_mod.time, "time", lambda: float(next(clock)))
    model, sizes = TinyNet(2), []
    model.features.register_forward_pre_hook(
        lambda m, args: sizes.append(tuple(args[0].shape[-2:]))
    )
    torch.manual_seed(0)
    params = AdaptParams(steps=100, crop=16, full_steps=50, site_look=0.0)
    losses = adapt_mod.finetune(model, PreprocessSpec(resize=40, crop=32), (imgs, ys),
                                (imgs, ys), params, seconds=60.0)  # fmt: skip
    # 10 s a step against 60 s: about 6 of the 100 steps run, the first half of the time at
    # the small crop and the rest at the model's own size, as the plan's halves are
    assert 3 <= len(losses) <= 7 and all(np.isfinite(losses))
    assert sizes[0] == (16, 16) and sizes[-1] == (32, 32)
