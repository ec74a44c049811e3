"""Training on a chosen device, the time budget of fine-tuning, and distillation from teachers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sortline.errors import ConfigError
from training.fit.train import FinetuneParams, train_finetune, training_device
from training.model.factory import create_model
from training.model.preprocess import PreprocessSpec

SPEC = PreprocessSpec(resize=40, crop=32)


def _images(n: int = 16, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(n)], np.arange(n) % 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_device_choice_without_a_gpu():
    assert training_device("auto").type == "cpu" and training_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU.*--device cpu"):
        training_device("cuda")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        training_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_train_device_cuda_without_a_gpu_is_one_line(tmp_path):
    from sortline.cli import cli
    from tests.unit.test_training import make_imagefolder

    data = make_imagefolder(tmp_path / "data", per_class=3)
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
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "run"),
            "--no-register",
        ],
    )
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: --device cuda: PyTorch sees no")


def test_finetune_starts_no_epoch_past_its_deadline():
    imgs, y = _images()
    params = FinetuneParams(epochs=5, batch_size=8, augment="finetune")
    model = create_model("tiny", num_classes=3)
    _, history = train_finetune(
        model, imgs, y, imgs, y, SPEC, params, num_classes=3, deadline=time.time()
    )
    assert len(history) == 1


def test_finetune_with_dataloader_workers_learns_the_same_shapes():
    imgs, y = _images()
    params = FinetuneParams(epochs=2, batch_size=8, augment="robust_mix", loader_workers=2)
    model, history = train_finetune(
        create_model("tiny", num_classes=3), imgs, y, imgs, y, SPEC, params, num_classes=3
    )
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in history)


def _teacher_file(path, *, seed: int, crop: int, manifest: str = "m1", temperature: float = 1.0):
    from training.model.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = create_model("tiny", num_classes=3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    meta = {
        "name": "t",
        "version": str(seed),
        "arch": "tiny",
        "classes": ["a", "b", "c"],
        "preprocess": PreprocessSpec(resize=crop + 8, crop=crop).to_dict(),
        "temperature": temperature,
        "manifest_sha256": manifest,
    }
    save_checkpoint(path, model, meta)
    return path


def test_teachers_average_calibrated_probabilities_at_their_own_size(tmp_path):
    import torch.nn.functional as F

    from training.fit.distill import load_teachers
    from training.model.checkpoint import load_checkpoint

    paths = [
        _teacher_file(tmp_path / "t0.safetensors", seed=0, crop=32, temperature=2.0),
        _teacher_file(tmp_path / "t1.safetensors", seed=1, crop=40),
    ]
    teachers = load_teachers(
        paths, classes=["a", "b", "c"], manifest_sha256="m1", student=SPEC, device="cpu"
    )
    x = torch.randn(4, 3, 32, 32)
    m0, m1 = (load_checkpoint(p)[0] for p in paths)
    up = F.interpolate(x, size=(40, 40), mode="bilinear", antialias=True)
    expected = (torch.softmax(m0(x) / 2.0, 1) + torch.softmax(m1(up), 1)) / 2
    got = teachers(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.sum(1), torch.ones(4), atol=1e-5)


def test_teachers_from_another_split_or_classes_are_refused(tmp_path):
    from training.fit.distill import load_teachers

    t = _teacher_file(tmp_path / "t.safetensors", seed=0, crop=32, manifest="other")
    with pytest.raises(ConfigError, match="another split.*same --data and --split-seed"):
        load_teachers(
            [t], classes=["a", "b", "c"], manifest_sha256="m1", student=SPEC, device="cpu"
        )
    with pytest.raises(ConfigError, match="classes a, b, c"):
        load_teachers(
            [t], classes=["x", "y", "z"], manifest_sha256="other", student=SPEC, device="cpu"
        )
    with pytest.raises(ConfigError, match="no checkpoint there"):
        load_teachers([tmp_path], classes=["a"], manifest_sha256="m1", student=SPEC, device="cpu")


def test_distillation_pulls_the_student_towards_the_teachers():
    """With the whole weight on the teachers, the student's val predictions move to theirs."""
    imgs, y = _images(24)
    target = torch.tensor([0.0, 0.0, 1.0])  # a 'teacher' sure of class 2 on every view

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return target.expand(len(x), 3)

    params = FinetuneParams(
        epochs=3,
        batch_size=8,
        lr=0.05,
        backbone_lr=0.05,
        augment="none",
        balance="none",
        label_smoothing=0.0,
        distill_weight=1.0,
    )
    model, history = train_finetune(
        create_model("tiny", num_classes=3),
        imgs,
        y,
        imgs,
        y,
        SPEC,
        params,
        num_classes=3,
        teacher=teacher,
    )
    from training.fit.evaluate import predict_logits

    assert (predict_logits(model, imgs, SPEC).argmax(1) == 2).all()
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finetune_on_cuda_in_bf16(tmp_path):
    from tests.unit.test_training import make_imagefolder
    from training.fit.run import RunConfig, train
    from training.fit.train import FrozenParams

    data = make_imagefolder(tmp_path / "data", per_class=4)
    cfg = RunConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        arch="tiny",
        pretrained="none",
        mode="finetune",
        device="cuda",
        robustness=False,
        register=False,
        frozen=FrozenParams(epochs=1),
        finetune=FinetuneParams(epochs=1, batch_size=8),
        cache_dir=str(tmp_path / "cache"),
    )
    summary = train(cfg)
    assert summary["ran_on"].startswith("cuda (")
    assert summary["metrics"]["test"]["n"] > 0
