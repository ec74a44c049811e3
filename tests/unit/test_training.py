"""Training: split, augmentation, tiny-model training runs, checkpoint round trip, ONNX parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from training.data.augment import PRESETS, build_augment, object_mask, replace_background
from training.data.dataset import SPLITS, load_split, manifest_sha256, read_manifest, write_manifest
from training.model.preprocess import PreprocessSpec, load_and_preprocess, preprocess

CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
COLOURS = [
    (160, 110, 60),
    (40, 140, 60),
    (150, 150, 170),
    (230, 225, 200),
    (40, 80, 200),
    (30, 30, 30),
]


def _photo(rng: np.random.Generator, colour) -> Image.Image:
    """A coloured blob on a light board, like a tiny TrashNet photo."""
    img = Image.new("RGB", (48, 64), (235, 235, 232))
    d = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(4, 20, 2))
    jitter = rng.integers(-25, 25, 3)
    d.ellipse(
        [x, y, x + 22, y + 30],
        fill=tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True)),
    )
    return img


def make_imagefolder(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Six classes of generated photos, one near-duplicate pair, one cross-class exact copy,
    one corrupt file."""
    rng = np.random.default_rng(seed)
    for c, colour in zip(CLASSES, COLOURS, strict=True):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _photo(rng, colour).save(root / c / f"{c}{i}.jpg", quality=92)
    # near duplicate: the same photo saved again at another quality
    Image.open(root / "glass" / "glass0.jpg").save(root / "glass" / "glass_dup.jpg", quality=60)
    # exact duplicate filed under another class
    (root / "metal" / "metal_copy.jpg").write_bytes((root / "glass" / "glass1.jpg").read_bytes())
    (root / "trash" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data") / "trashnet")


@pytest.fixture(scope="module")
def frozen_run(imagefolder, tmp_path_factory) -> dict:
    from training.fit.run import RunConfig, train
    from training.fit.train import FrozenParams

    out = tmp_path_factory.mktemp("run")
    epochs: list[dict] = []
    cfg = RunConfig(
        data=str(imagefolder),
        out=str(out),
        arch="tiny",
        pretrained="none",
        mode="frozen",
        frozen=FrozenParams(epochs=2),
        aug_views=2,
        register=False,
        version="t1",
        cache_dir=str(out / "cache"),
    )
    summary = train(cfg, on_epoch=epochs.append)
    return {"out": out, "summary": summary, "epochs": epochs, "cfg": cfg}


# ---------------------------------------------------------------- data


def test_split_is_deterministic_and_keeps_groups_whole(imagefolder):
    a, b = load_split(imagefolder), load_split(imagefolder)
    assert manifest_sha256(a) == manifest_sha256(b)
    assert [s.split for s in a.samples] == [s.split for s in b.samples]
    by_file = {s.file: s for s in a.samples}
    assert by_file["glass/glass0.jpg"].group == by_file["glass/glass_dup.jpg"].group
    assert by_file["glass/glass0.jpg"].split == by_file["glass/glass_dup.jpg"].split
    assert by_file["glass/glass1.jpg"].split == by_file["metal/metal_copy.jpg"].split
    groups: dict[int, set] = {}
    for s in a.samples:
        groups.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in groups.values())


def test_split_is_stratified_and_skips_corrupt(imagefolder):
    ds = load_split(imagefolder)
    assert [f for f, _ in ds.skipped] == ["trash/broken.jpg"]
    counts = ds.counts()
    for c in CLASSES:
        assert all(counts[sp][c] >= 1 for sp in SPLITS), counts
        assert counts["train"][c] > counts["val"][c]
    other = load_split(imagefolder, seed=1)
    assert manifest_sha256(other) != manifest_sha256(ds)


def test_manifest_files_and_reload(imagefolder, tmp_path):
    ds = load_split(imagefolder)
    sha = write_manifest(ds, tmp_path)
    info = json.loads((tmp_path / "manifest.json").read_text())
    assert info["manifest_sha256"] == sha
    assert info["skipped"][0]["file"] == "trash/broken.jpg"
    again = read_manifest(tmp_path / "manifest.csv", imagefolder)
    assert [(s.file, s.split, s.sha256) for s in again.samples] == [
        (s.file, s.split, s.sha256) for s in ds.samples
    ]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    from training.data.dataset import DatasetError, scan_imagefolder

    with pytest.raises(DatasetError, match="not found"):
        scan_imagefolder(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no class folders"):
        scan_imagefolder(tmp_path)


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("name", PRESETS)
def test_presets_give_normalised_crops(name):
    spec = PreprocessSpec(resize=40, crop=32)
    f = build_augment(name, spec)
    img = _photo(np.random.default_rng(0), COLOURS[0])
    x = f(img)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32


def test_none_preset_is_the_eval_transform():
    spec = PreprocessSpec(resize=40, crop=32)
    img = _photo(np.random.default_rng(1), COLOURS[1])
    assert np.array_equal(build_augment("none", spec)(img), preprocess(img, spec))


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="combined"):
        build_augment("sideways", PreprocessSpec())


def test_background_replacement_keeps_the_object():
    img = _photo(np.random.default_rng(2), COLOURS[4]).resize((96, 128))
    mask = object_mask(np.asarray(img))
    assert mask is not None and 0.04 < mask.mean() < 0.5
    out = np.asarray(replace_background(img, "wood", np.random.default_rng(0)), dtype=np.int16)
    src = np.asarray(img, dtype=np.int16)
    inside = mask > 0.99
    assert np.abs(out[inside] - src[inside]).mean() < 3  # object untouched
    assert np.abs(out[mask < 0.01] - src[mask < 0.01]).mean() > 20  # board replaced


# ---------------------------------------------------------------- training


def test_frozen_run_writes_its_folder(frozen_run):
    out = frozen_run["out"]
    for f in (
        "manifest.csv",
        "manifest.json",
        "metrics.json",
        "history.csv",
        "curves.png",
        "confusion_matrix.png",
        "classification_report.txt",
        "model.safetensors",
        "robustness.json",
    ):
        assert (out / f).exists(), f
    assert [e["epoch"] for e in frozen_run["epochs"]] == [1, 2]
    assert {"val_loss", "val_acc", "val_macro_f1"} <= set(frozen_run["epochs"][0])
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] > 0 and set(m["test"]["per_class"]) == set(CLASSES)
    assert m["calibration"]["split"] == "val" and m["calibration"]["temperature"] > 0
    ci = m["test"]["intervals"]  # the bootstrap 95% intervals the model card reports
    assert ci["accuracy"][0] <= m["test"]["accuracy"] <= ci["accuracy"][1]
    assert set(ci["per_class_f1"]) == set(CLASSES)


def test_checkpoint_round_trip(frozen_run):
    from training.model.checkpoint import file_sha256, load_checkpoint, read_metadata

    ckpt = frozen_run["out"] / "model.safetensors"
    meta = read_metadata(ckpt)
    assert meta["classes"] == CLASSES and meta["arch"] == "tiny"
    assert (
        meta["manifest_sha256"]
        == json.loads((frozen_run["out"] / "manifest.json").read_text())["manifest_sha256"]
    )
    assert meta["metrics"]["test"]["n"] == frozen_run["summary"]["metrics"]["test"]["n"]
    assert meta["training"]["mode"] == "frozen"
    model, _ = load_checkpoint(ckpt, expected_sha256=file_sha256(ckpt))
    x = torch.zeros(2, 3, 32, 32)
    assert model(x).shape == (2, 6)


def test_stored_eval_transform_is_preprocess(frozen_run, imagefolder):
    """The checkpoint's spec, applied by the worker's path (bytes), gives training's logits."""
    from training.data.dataset import load_resized
    from training.fit.evaluate import predict_logits
    from training.model.checkpoint import load_checkpoint, preprocess_spec
    from training.model.factory import ARCHS

    model, meta = load_checkpoint(frozen_run["out"] / "model.safetensors")
    spec = preprocess_spec(meta)
    info = ARCHS["tiny"]
    assert spec == PreprocessSpec(mean=info.mean, std=info.std)
    ds = load_split(imagefolder)
    test = ds.split("test")
    via_training = predict_logits(model, load_resized(ds, test), spec)
    via_worker = np.stack(
        [
            model(
                torch.from_numpy(load_and_preprocess((imagefolder / s.file).read_bytes(), spec))[
                    None
                ]
            )
            .detach()
            .numpy()[0]
            for s in test
        ]
    )
    np.testing.assert_allclose(via_training, via_worker, atol=1e-4)


def test_frozen_head_learns_separable_features():
    from training.fit.train import Features, FrozenParams, train_frozen

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y = np.repeat(np.arange(3), 30)
    x = (centres[y] + rng.normal(size=(90, 8))).astype(np.float32)
    seen = []
    head, hist = train_frozen(Features(x, y, x, y, 3), FrozenParams(epochs=6, lr=0.05), seen.append)
    assert len(seen) == 6 and hist[-1]["val_acc"] > 0.9
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]


def test_finetune_run_with_wise_selection(imagefolder, tmp_path):
    from training.fit.run import RunConfig, train
    from training.fit.train import FinetuneParams, FrozenParams

    cfg = RunConfig(
        data=str(imagefolder),
        out=str(tmp_path),
        arch="tiny",
        pretrained="none",
        mode="finetune",
        frozen=FrozenParams(epochs=2),
        balance="sampler",
        robustness=False,
        register=False,
        finetune=FinetuneParams(
            epochs=2, batch_size=8, ema_decay=0.9, wise_alphas=(0.5, 1.0), tta=True
        ),
        cache_dir=str(tmp_path / "cache"),
    )
    s = train(cfg)
    m = s["metrics"]
    assert (
        set(m["wise_selection"]["alphas"]) == {"0.5", "1.0"}
        and m["wise_selection"]["split"] == "val"
    )
    assert "test_flip_tta" in m
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 3


def test_layer_decay_lowers_the_rate_block_by_block_towards_the_input():
    from training.fit.train import FinetuneParams, _optimizer
    from training.model.factory import create_model

    model = create_model("efficientnet_lite0", num_classes=6, pretrained="none")
    flat, _ = _optimizer(model, FinetuneParams(backbone_lr=1e-3, lr=1e-2), 64)
    assert [g["initial_lr"] for g in flat.param_groups] == [1e-3, 1e-2]
    opt, _ = _optimizer(model, FinetuneParams(backbone_lr=1e-3, lr=1e-2, layer_decay=0.5), 64)
    lrs = [g["initial_lr"] for g in opt.param_groups]
    # conv_stem, bn1, 7 stages of blocks, conv_head, bn2, then the head
    assert len(lrs) == 12 and lrs[-1] == 1e-2 and lrs[-2] == pytest.approx(1e-3)
    assert lrs[:-1] == pytest.approx([1e-3 * 0.5**k for k in range(10, -1, -1)])
    first = {id(p) for p in opt.param_groups[0]["params"]}
    assert first == {id(p) for p in model.conv_stem.parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_drop_path_is_stochastic_in_training_only():
    from sortline.errors import ConfigError
    from training.model.factory import create_model

    model = create_model("efficientnet_lite0", num_classes=6, pretrained="none", drop_path=0.2)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), model(x))
        torch.manual_seed(0)
        a = model.train()(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(x))
    with pytest.raises(ConfigError, match="needs a timm architecture"):
        create_model("tiny", num_classes=6, drop_path=0.1)


# ---------------------------------------------------------------- calibration, export


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    from training.model.calibration import calibration

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4))
    logits[np.arange(400), y] += 1.0
    logits *= 6  # overconfident
    cal = calibration(logits, y)
    assert cal["temperature"] > 1.5
    assert cal["nll_after"] < cal["nll_before"] and cal["ece_after"] < cal["ece_before"]


def test_onnx_export_matches_pytorch(frozen_run, tmp_path):
    import onnxruntime as ort

    from training.model.checkpoint import load_checkpoint
    from training.model.export import cached_onnx, export_onnx

    ckpt = frozen_run["out"] / "model.safetensors"
    info = export_onnx(ckpt, tmp_path / "m.onnx")
    assert info["max_abs_diff"] < 1e-4
    model, meta = load_checkpoint(ckpt)
    crop = meta["preprocess"]["crop"]
    x = np.random.default_rng(1).standard_normal((5, 3, crop, crop)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        sess.run(None, {"input": x})[0], model(torch.from_numpy(x)).detach().numpy(), atol=1e-4
    )
    p1 = cached_onnx(ckpt, tmp_path / "cache")
    assert p1.exists() and cached_onnx(ckpt, tmp_path / "cache") == p1


def test_half_checkpoint_loads_as_float32(frozen_run, tmp_path):
    from training.model.checkpoint import load_checkpoint, read_metadata, save_checkpoint

    model, meta = load_checkpoint(frozen_run["out"] / "model.safetensors")
    save_checkpoint(tmp_path / "h.safetensors", model, meta, half=True)
    m2, meta2 = load_checkpoint(tmp_path / "h.safetensors")
    assert next(m2.parameters()).dtype == torch.float32
    assert read_metadata(tmp_path / "h.safetensors")["temperature"] == meta["temperature"]


def test_robustness_report_is_deterministic():
    from training.fit.robustness import CORRUPTIONS, corrupt, robustness_report
    from training.model.factory import create_model

    rng = np.random.default_rng(0)
    imgs = [np.asarray(_photo(rng, COLOURS[i % 6]).resize((96, 128))) for i in range(6)]
    a = corrupt(imgs, "scene")
    b = corrupt(imgs, "scene")
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    model = create_model("tiny", num_classes=6).eval()
    rep = robustness_report(model, imgs, list(range(6)), PreprocessSpec(resize=40, crop=32))
    assert set(rep["per_corruption"]) == set(CORRUPTIONS)
    assert 0 <= rep["mean_corrupted"]["accuracy"] <= 1


def test_register_records_the_checkpoint(frozen_run, tmp_path, monkeypatch):
    from db.engine import session_scope
    from db.service import active_model, get_model
    from training.config import DEFAULT_CHECKPOINT
    from training.fit.run import register
    from training.model.checkpoint import file_sha256, read_metadata

    url = f"sqlite:///{tmp_path / 'reg.db'}"
    monkeypatch.setenv("SORTLINE_DATABASE_URL", url)
    ckpt = frozen_run["out"] / "model.safetensors"
    assert register(ckpt) == "sortline-trashnet:t1"
    with session_scope(url) as s:
        rec = get_model(s, ref="sortline-trashnet:t1")
        assert rec.sha256 == file_sha256(ckpt) and rec.classes == CLASSES
        assert rec.metrics["test"]["n"] > 0
        shipped = read_metadata(DEFAULT_CHECKPOINT)["version"]
        assert not rec.active and active_model(s).version == shipped  # a candidate
