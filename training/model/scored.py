"""A checkpoint's model that also scores how unfamiliar each image is, in one forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ScoredModel(torch.nn.Module):
    """A classifier that also returns each image's unfamiliarity score, in one forward pass."""

    def __init__(self, model: torch.nn.Module, stats: dict[str, np.ndarray]):
        super().__init__()
        self.model = model
        self.register_buffer("whiten", torch.from_numpy(np.asarray(stats["whiten"], np.float32)))
        self.register_buffer("means", torch.from_numpy(np.asarray(stats["means"], np.float32)))
        self.detector = "det_w" in stats  # see training.model.unfamiliarity.score
        for k in ("det_w", "det_b", "norm") if self.detector else ():
            self.register_buffer(k, torch.from_numpy(np.asarray(stats[k], np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from training.model.factory import forward_features, head_module

        f = forward_features(self.model, x)
        whiten, means = self.get_buffer("whiten"), self.get_buffer("means")
        z = f.float() @ whiten
        d = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means**2).sum(1)
        score = d.min(1).values
        if self.detector:
            norm = self.get_buffer("norm")
            logit = f.float() @ self.get_buffer("det_w") + self.get_buffer("det_b")
            score = torch.maximum((score - norm[0]) / norm[1], (logit - norm[2]) / norm[3])
        return head_module(self.model)(f), score


def scored(checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model, wrapped in :class:`ScoredModel` when it has the statistics."""
    from training.model.checkpoint import load_checkpoint, read_unfamiliarity

    model, meta = load_checkpoint(checkpoint)
    stats = read_unfamiliarity(checkpoint)
    return (ScoredModel(model, stats).eval() if stats else model), meta
