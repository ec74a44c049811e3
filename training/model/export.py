"""ONNX export of a checkpoint, checked against PyTorch, and a cache of exported models."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from sortline.errors import SortlineError

log = logging.getLogger(__name__)


class ExportError(SortlineError, RuntimeError):
    """The exported model disagrees with PyTorch beyond the tolerance."""


class ScoredModel(torch.nn.Module):
    """A classifier that also returns each image's unfamiliarity score, in one forward pass."""

    def __init__(self, model: torch.nn.Module, stats: dict[str, np.ndarray]):
        super().__init__()
        self.model = model
        self.register_buffer("whiten", torch.from_numpy(np.asarray(stats["whiten"], np.float32)))
        self.register_buffer("means", torch.from_numpy(np.asarray(stats["means"], np.float32)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from training.model.factory import forward_features, head_module

        f = forward_features(self.model, x)
        z = f.float() @ self.whiten
        d = (z * z).sum(1, keepdim=True) - 2 * z @ self.means.T + (self.means**2).sum(1)
        return head_module(self.model)(f), d.min(1).values


def scored(checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model, wrapped in :class:`ScoredModel` when it has the statistics."""
    from training.model.checkpoint import load_checkpoint, read_unfamiliarity

    model, meta = load_checkpoint(checkpoint)
    stats = read_unfamiliarity(checkpoint)
    return (ScoredModel(model, stats).eval() if stats else model), meta


def export_onnx(
    checkpoint: str | Path, out: str | Path, *, atol: float = 1e-3, opset: int = 17
) -> dict:
    """Export *checkpoint* to ONNX at *out* (dynamic batch axis) and check parity.

    Returns the largest absolute logit difference against PyTorch on a random batch of 3;
    raises :class:`ExportError` if it exceeds *atol* or the top-1 classes differ. A checkpoint
    with unfamiliarity statistics gets a second output, ``unfamiliarity``.
    """
    import onnxruntime as ort

    from training.model.checkpoint import preprocess_spec

    model, meta = scored(checkpoint)
    names = ["logits", "unfamiliarity"] if isinstance(model, ScoredModel) else ["logits"]
    spec = preprocess_spec(meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, spec.crop, spec.crop)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=names,
        dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
    )
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((3, 3, spec.crop, spec.crop)).astype(np.float32)
    )
    with torch.no_grad():
        ref_all = model(x)
    ref_all = [t.numpy() for t in (ref_all if isinstance(ref_all, tuple) else (ref_all,))]
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got_all = sess.run(None, {"input": x.numpy()})
    ref, got = ref_all[0], got_all[0]
    diff = float(np.abs(ref - got).max())
    if len(ref_all) > 1:  # the score, to a relative tolerance (distances are large numbers)
        rel = np.abs(ref_all[1] - got_all[1]) / np.maximum(1.0, np.abs(ref_all[1]))
        diff = max(diff, float(rel.max()))
    if diff > atol or (ref.argmax(1) != got.argmax(1)).any():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX output differs from PyTorch by {diff:.2e} (tolerance {atol:.0e})")
    tmp.replace(out)
    log.info("exported %s -> %s (max |diff| %.2e)", checkpoint, out, diff)
    return {"path": str(out), "max_abs_diff": diff, "opset": opset}


def cached_onnx(checkpoint: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The ONNX export of *checkpoint*, made on first use and kept in a cache keyed by its sha256."""
    from training.config import get_training_settings
    from training.model.checkpoint import file_sha256

    cache = Path(cache_dir) if cache_dir else get_training_settings().cache_dir / "onnx"
    path = cache / f"{Path(checkpoint).stem}-{file_sha256(checkpoint)[:16]}.onnx"
    if not path.exists():
        export_onnx(checkpoint, path)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m training.model.export CHECKPOINT [--cache-dir DIR]``: print the export's path.

    The ONNX worker runs this in a child process, so that it never imports torch itself.
    """
    import argparse

    ap = argparse.ArgumentParser(description="Print the cached ONNX export of a checkpoint.")
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    print(cached_onnx(a.checkpoint, a.cache_dir))


if __name__ == "__main__":
    main()
