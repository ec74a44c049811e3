"""Distillation: one student fine-tuned on the averaged probabilities of several teacher runs.

The teachers see the student's own augmented batch (resized to each teacher's input size and
renormalised for it), so the student learns the ensemble's answer on exactly the views it is
trained on. Each teacher's probabilities are calibrated with its stored temperature before
they are averaged. Teachers must come from the same split as the student (same manifest), or
the val and test figures would count images the teachers were trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sortline.errors import ConfigError
from training.model.checkpoint import load_checkpoint, preprocess_spec
from training.model.preprocess import PreprocessSpec

log = logging.getLogger(__name__)


def teacher_checkpoint(path: str | Path) -> Path:
    """The checkpoint of a teacher given as a run folder or as a checkpoint file."""
    path = Path(path)
    ckpt = path / "model.safetensors" if path.is_dir() else path
    if not ckpt.is_file():
        raise ConfigError(f"teacher {path}: no checkpoint there (a run folder or a .safetensors)")
    return ckpt


class Teachers(nn.Module):
    """Averaged calibrated class probabilities of several models on the student's input batch."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        specs: Sequence[PreprocessSpec],
        temperatures: Sequence[float],
        student: PreprocessSpec,
    ) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        for p in self.models.parameters():
            p.requires_grad_(False)
        self.specs, self.temperatures, self.student = list(specs), list(temperatures), student

    def _input(self, x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
        s = self.student
        if (spec.mean, spec.std) != (s.mean, s.std):
            m_s, s_s, m_t, s_t = (
                torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                for v in (s.mean, s.std, spec.mean, spec.std)
            )
            x = (x * s_s + m_s - m_t) / s_t
        if spec.crop != x.shape[-1] or spec.crop != x.shape[-2]:
            x = F.interpolate(x, size=(spec.crop, spec.crop), mode="bilinear", antialias=True)
        return x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) probabilities: the mean over teachers of softmax(logits / temperature)."""
        self.models.eval()
        total = None
        for model, spec, t in zip(self.models, self.specs, self.temperatures, strict=True):
            p = torch.softmax(model(self._input(x, spec)).float() / t, dim=1)
            total = p if total is None else total + p
        return total / len(self.models)


def load_teachers(
    paths: Sequence[str | Path],
    *,
    classes: list[str],
    manifest_sha256: str,
    student: PreprocessSpec,
    device: torch.device,
) -> Teachers:
    """Load teacher runs for a student trained on *classes* and the split *manifest_sha256*."""
    models, specs, temps = [], [], []
    for path in paths:
        ckpt = teacher_checkpoint(path)
        model, meta = load_checkpoint(ckpt)
        if meta["classes"] != classes:
            raise ConfigError(
                f"teacher {path} has classes {', '.join(meta['classes'])}, the data "
                f"{', '.join(classes)}; train the teachers on the same ImageFolder"
            )
        if meta.get("manifest_sha256") != manifest_sha256:
            raise ConfigError(
                f"teacher {path} was trained on another split (manifest "
                f"{str(meta.get('manifest_sha256'))[:12]}, this run {manifest_sha256[:12]}); "
                "train the teachers with the same --data and --split-seed"
            )
        models.append(model.to(device).to(memory_format=torch.channels_last).eval())
        specs.append(preprocess_spec(meta))
        temps.append(float(meta.get("temperature", 1.0)))
        log.info("teacher %s (%s, %s px)", ckpt, meta["arch"], specs[-1].crop)
    if not models:
        raise ConfigError("distillation needs at least one teacher run")
    return Teachers(models, specs, temps, student)
