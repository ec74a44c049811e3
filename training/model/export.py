"""ONNX export of a checkpoint (fp32, or int8 by static quantization), checked, and cached.

The fp32 export is checked against PyTorch; the int8 model, built from the fp32 export and a
calibration file shipped beside the checkpoint (``<name>.int8.json``, activation ranges from
training images, made by ``sortline quantize``), is checked against the fp32 export on real
photos. Both are cached under ``SORTLINE_CACHE_DIR/onnx`` keyed by the checkpoint's sha256.
torch is imported only to export, so the ONNX worker can read calibrations without it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sortline.errors import ConfigError, SortlineError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "int8")
# name -> (ONNX Runtime's calibration method, its options)
CALIBRATION_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("MinMax", {}),
    "minmax-average": ("MinMax", {"CalibMovingAverage": True}),  # moving average of batch ranges
    "percentile": ("Percentile", {"CalibPercentile": 99.999}),
    "entropy": ("Entropy", {}),
}
MAX_DISAGREEMENT = 0.01  # int8 labels may differ from fp32 on at most 1% of the check images
CHECK_IMAGES = 100  # val images stored in the calibration file for the parity check


class ExportError(SortlineError, RuntimeError):
    """The exported model disagrees with its reference beyond the tolerance."""


def _static_same_padding(model, size: int) -> None:
    """Give each TF-"same" convolution a fixed padding for *size* x *size* inputs.

    timm computes that padding from the input's shape at run time; exported as such it
    becomes a dynamic Pad that ONNX Runtime can neither fuse into the convolution nor keep
    in int8. Workers only ever feed the checkpoint's crop size, so the padding is constant.
    """
    import torch
    import torch.nn.functional as F
    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    class StaticPadConv(torch.nn.Module):
        def __init__(self, conv: torch.nn.Conv2d, pads: tuple[int, int, int, int]):
            super().__init__()
            self.conv, self.pads = conv, pads

        def forward(self, x):
            c = self.conv
            return F.conv2d(
                F.pad(x, self.pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups
            )

    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: sizes.__setitem__(n, tuple(a[0].shape[-2:])))
        for n, m in model.named_modules()
        if isinstance(m, Conv2dSame)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for name, (ih, iw) in sizes.items():
        conv = model.get_submodule(name)
        ph = get_same_padding(ih, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pw = get_same_padding(iw, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        parent, _, leaf = name.rpartition(".")
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        setattr(model.get_submodule(parent) if parent else model, leaf, StaticPadConv(conv, pads))


def export_onnx(
    checkpoint: str | Path, out: str | Path, *, atol: float = 1e-3, opset: int = 17
) -> dict:
    """Export *checkpoint* to ONNX at *out* (dynamic batch axis) and check parity.

    Returns the largest absolute logit difference against PyTorch on a random batch of 3;
    raises :class:`ExportError` if it exceeds *atol* or the top-1 classes differ. A checkpoint
    with unfamiliarity statistics gets a second output, ``unfamiliarity``.
    """
    import onnxruntime as ort
    import torch

    from training.model.checkpoint import preprocess_spec
    from training.model.scored import ScoredModel, scored

    model, meta = scored(checkpoint)
    names = ["logits", "unfamiliarity"] if isinstance(model, ScoredModel) else ["logits"]
    spec = preprocess_spec(meta)
    x = torch.from_numpy(
        np.random.default_rng(0).standard_normal((3, 3, spec.crop, spec.crop)).astype(np.float32)
    )
    with torch.no_grad():
        ref_all = model(x)
    ref_all = [t.numpy() for t in (ref_all if isinstance(ref_all, tuple) else (ref_all,))]
    _static_same_padding(model, spec.crop)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, spec.crop, spec.crop),),
        str(tmp),
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=names,
        dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
    )
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


# ---------------------------------------------------------------- int8


def calibration_path(checkpoint: str | Path) -> Path:
    """Where the int8 calibration of *checkpoint* lives: ``<name>.int8.json`` beside it."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".int8.json")


def read_calibration(checkpoint: str | Path) -> dict | None:
    """The provenance of the int8 calibration made for this very file (its sha256), or None."""
    from training.model.checkpoint import file_sha256

    path = calibration_path(checkpoint)
    if not path.is_file():
        return None
    info = json.loads(path.read_text()).get("sortline", {})
    if info.get("checkpoint_sha256") != file_sha256(checkpoint):
        log.warning("%s was made for another checkpoint than %s; ignoring it", path, checkpoint)
        return None
    return info


def resolve_precision(checkpoint: str | Path, precision: str) -> str:
    """``fp32`` or ``int8`` for a requested ``auto``, ``fp32`` or ``int8`` (ONNX Runtime).

    ``auto`` is int8 wherever the checkpoint has its calibration file, else fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"SORTLINE_PRECISION must be auto, fp32 or int8, not {precision!r}")
    if precision == "fp32":
        return "fp32"
    found = read_calibration(checkpoint) is not None
    if precision == "int8" and not found:
        raise ConfigError(
            f"no int8 calibration for {checkpoint} (expected {calibration_path(checkpoint)}, made "
            "for this file); make one with `sortline quantize DATA --checkpoint "
            f"{checkpoint}`, or set SORTLINE_PRECISION=fp32"
        )
    return "int8" if found else "fp32"


class _Reader:
    """Calibration batches for ONNX Runtime, in strides so histograms fit in memory."""

    def __init__(self, arrays: np.ndarray, batch: int = 10):
        self.arrays, self.batch = arrays, batch
        self.lo, self.hi = 0, len(arrays)
        self.i = 0

    def __len__(self) -> int:
        return len(self.arrays)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.lo, self.hi, self.i = start_index, end_index, start_index

    def get_next(self) -> dict | None:
        if self.i >= self.hi:
            return None
        x = self.arrays[self.i : min(self.hi, self.i + self.batch)]
        self.i += self.batch
        return {"input": x}

    def rewind(self) -> None:
        self.i = self.lo


def quantize_onnx(
    fp32: str | Path,
    out: str | Path,
    *,
    calibration: str | Path,
    method: str = "minmax",
    arrays: np.ndarray | None = None,
) -> Path:
    """Static int8 quantization of an fp32 export: QDQ, int8 per-channel weights, uint8 activations.

    Activation ranges come from *calibration* (ONNX Runtime's calibration cache); when that
    file does not exist yet, they are measured on *arrays* (preprocessed images) with
    *method* and written there.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        names = ", ".join(CALIBRATION_METHODS)
        raise ConfigError(f"calibration method must be one of {names}, not {method!r}")
    ort_method, options = CALIBRATION_METHODS[method]
    out = Path(out)
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    exclude = unfamiliarity_nodes(pre)
    stride: int | None = None
    if arrays is not None:
        stride = next(s for s in (50, 30, 20, 10, 5, 2, 1) if len(arrays) % s == 0)
    try:
        quantize_static(
            str(pre),
            str(out),
            _Reader(arrays) if arrays is not None else None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[ort_method],
            extra_options={**options, **({"CalibStridedMinMax": stride} if stride else {})},
            calibration_cache_path=str(calibration),
            nodes_to_exclude=exclude,
        )
    finally:
        pre.unlink(missing_ok=True)
    return out


def unfamiliarity_nodes(path: str | Path) -> list[str]:
    """Names of the nodes computing the unfamiliarity score from the pooled features.

    They stay float32 in the int8 model: quantized, their activations were clipped to the
    ranges seen on the calibration photos (clean training photos), so no image could score
    above the threshold (measured: 0 of 1605 shifted test photos unfamiliar in int8, 31% in
    fp32). The classifier's product stays int8 as calibrated.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    outputs = [o.name for o in graph.output]
    if "unfamiliarity" not in outputs:
        return []
    producers = {out: n for n in graph.node for out in n.output}
    branch: set[str] = set()
    todo = ["unfamiliarity"]
    head = producers[outputs[0]]  # the logits' last node: walk up to the pooled features
    shared = set()
    stack = list(head.input)
    while stack:
        t = stack.pop()
        if t in producers and t not in shared:
            shared.add(t)
            stack.extend(producers[t].input)
    while todo:  # the score's own nodes: up from its output until the shared features
        t = todo.pop()
        node = producers.get(t)
        if node is None or t in shared or node.name in branch:
            continue
        branch.add(node.name)
        todo.extend(node.input)
    return sorted(branch)


def onnx_outputs(path: str | Path, arrays: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Every output of an ONNX model (logits, then the score if any) for *arrays*, on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    runs = [sess.run(None, {"input": arrays[i : i + batch]}) for i in range(0, len(arrays), batch)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def onnx_logits(path: str | Path, arrays: np.ndarray, batch: int = 16) -> np.ndarray:
    """Logits of an ONNX model for preprocessed *arrays*, on the CPU."""
    return onnx_outputs(path, arrays, batch)[0]


def check_labels(
    fp32: str | Path, int8: str | Path, arrays: np.ndarray, *, limit: float = MAX_DISAGREEMENT
) -> float:
    """The share of *arrays* whose int8 label differs from fp32; :class:`ExportError` above *limit*."""
    a = onnx_logits(fp32, arrays).argmax(1)
    b = onnx_logits(int8, arrays).argmax(1)
    share = float((a != b).mean())
    if share > limit:
        raise ExportError(
            f"int8 model refused: its labels differ from fp32 on {int((a != b).sum())} of "
            f"{len(arrays)} check images ({share:.1%} > {limit:.0%}); recalibrate with "
            "`sortline quantize`, or set SORTLINE_PRECISION=fp32"
        )
    return share


def encode_check_images(images, spec) -> list[str]:
    """Check images as stored in a calibration file: the model's crop, JPEG, base64."""
    import base64
    import io

    from training.model.preprocess import resize_crop

    out = []
    for img in images:
        buf = io.BytesIO()
        resize_crop(img, spec).save(buf, "JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def check_arrays(checkpoint: str | Path) -> np.ndarray:
    """The check images of *checkpoint*'s calibration file (else the sample photos), preprocessed."""
    import base64

    from training.config import SAMPLES_DIR
    from training.model.checkpoint import preprocess_spec, read_metadata
    from training.model.imaging import decode_image
    from training.model.preprocess import normalise, resize_crop

    spec = preprocess_spec(read_metadata(checkpoint))
    info = json.loads(calibration_path(checkpoint).read_text())["sortline"]
    images = [decode_image(base64.b64decode(b)) for b in info.get("check_images", [])]
    if not images:  # the shipped calibration holds no dataset photos: the bundled samples
        files = sorted(SAMPLES_DIR.glob("*/*.jpg"))
        images = [resize_crop(decode_image(f.read_bytes()), spec) for f in files]
    if not images:
        raise ExportError(f"{calibration_path(checkpoint)} holds no check images; recalibrate")
    return np.stack([normalise(img, spec) for img in images])


def _build_int8(checkpoint: Path, fp32: Path, out: Path) -> None:
    info = read_calibration(checkpoint)
    if info is None:
        resolve_precision(checkpoint, "int8")  # raises, naming the missing file
        raise ExportError(f"{checkpoint} has no int8 calibration")
    tmp = out.with_suffix(".tmp.onnx")
    quantize_onnx(fp32, tmp, calibration=calibration_path(checkpoint), method=info["method"])
    arrays = check_arrays(checkpoint)
    try:
        share = check_labels(fp32, tmp, arrays)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    log.info(
        "quantized %s -> %s (%.1f%% labels differ on %d check images)",
        checkpoint,
        out,
        100 * share,
        len(arrays),
    )


def cached_onnx(
    checkpoint: str | Path, cache_dir: str | Path | None = None, *, precision: str = "fp32"
) -> Path:
    """The ONNX model of *checkpoint* at *precision*, made on first use, cached by its sha256."""
    from training.config import get_training_settings
    from training.model.checkpoint import file_sha256

    checkpoint = Path(checkpoint)
    precision = resolve_precision(checkpoint, precision)
    cache = Path(cache_dir) if cache_dir else get_training_settings().cache_dir / "onnx"
    key = f"{checkpoint.stem}-{file_sha256(checkpoint)[:16]}"
    path = cache / f"{key}.fp32.onnx"
    if not path.exists():
        export_onnx(checkpoint, path)
    if precision == "int8":
        path8 = cache / f"{key}.int8.onnx"
        if not path8.exists():
            _build_int8(checkpoint, path, path8)
        return path8
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m training.model.export CHECKPOINT [--cache-dir DIR] [--precision P]``: print the path.

    The ONNX worker runs this in a child process, so that it never imports torch itself.
    """
    import argparse

    ap = argparse.ArgumentParser(description="Print the cached ONNX export of a checkpoint.")
    ap.add_argument("checkpoint")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    a = ap.parse_args(argv)
    print(cached_onnx(a.checkpoint, a.cache_dir, precision=a.precision))


if __name__ == "__main__":
    main()
