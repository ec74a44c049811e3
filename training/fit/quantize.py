"""int8 calibration of a checkpoint: methods compared on val, the best one kept beside it.

Activation ranges are measured on a few hundred training images of the dataset's split;
each calibration method gives an int8 model that is scored on the val split against the
fp32 export. The best (val macro-F1, then agreement with fp32) is written to the
checkpoint's calibration file, with a hundred val photos on which every worker checks the
int8 model it builds from that file against fp32 (at most 1% of labels may differ). The
shipped model's file has those photos removed (no dataset photos in the repository); its
check runs on the sample photos (``training.config.SAMPLES_DIR``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from training.model.export import (
    CHECK_IMAGES,
    MAX_DISAGREEMENT,
    ExportError,
    cached_onnx,
    calibration_path,
    encode_check_images,
    onnx_logits,
    onnx_outputs,
    quantize_onnx,
)
from training.model.unfamiliarity import VAL_FLAGGED

log = logging.getLogger(__name__)

# the histogram methods (percentile, entropy) take many minutes on a 2-core machine: asked by name
DEFAULT_METHODS = ("minmax", "minmax-average")


def _image(ds, sample):
    from training.model.imaging import decode_image

    return decode_image((ds.root / sample.file).read_bytes())


def _arrays(ds, samples, spec) -> np.ndarray:
    from training.model.preprocess import load_and_preprocess

    return np.stack([load_and_preprocess((ds.root / s.file).read_bytes(), spec) for s in samples])


def _best_method(fp32, methods, calib, xv, ref, score, report) -> tuple[str, dict]:
    """Quantize with each method; keep the best val macro-F1 whose labels stay within 1%.

    Where the model scores unfamiliarity, the kept method's threshold is refitted on its own
    val scores (int8 features move the score a little: the share of val flagged stays 5%)."""
    best = None
    with tempfile.TemporaryDirectory(prefix="sortline-int8-") as tmp:
        for method in methods:
            cal = Path(tmp) / f"{method}.json"
            model = quantize_onnx(
                fp32, Path(tmp) / f"{method}.onnx", calibration=cal, method=method, arrays=calib
            )
            outputs = onnx_outputs(model, xv)
            s = score(outputs[0], ref)
            if len(outputs) > 1:
                s["unfamiliar_threshold"] = float(np.quantile(outputs[1], 1 - VAL_FLAGGED))
            report["methods"][method] = s
            log.info("int8 %s on val: %s", method, s)
            if s["agreement"] >= 1 - MAX_DISAGREEMENT and (
                best is None or (s["macro_f1"], s["agreement"]) > best[0]
            ):
                best = ((s["macro_f1"], s["agreement"]), method, cal)
        if best is None:
            raise ExportError(
                f"no calibration method keeps the val labels within {MAX_DISAGREEMENT:.0%} of "
                f"fp32: {report['methods']}; this model stays fp32"
            )
        _, method, cal = best
        return method, json.loads(cal.read_text())


def calibrate_int8(
    checkpoint: str | Path,
    data: str | Path,
    *,
    images: int = 300,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    seed: int = 0,
) -> dict:
    """Calibrate *checkpoint* for int8 on *data*'s split; write its calibration file.

    Returns the fp32 and per-method val figures and the method kept. Raises
    :class:`ExportError` if no method keeps the val labels within 1% of fp32.
    """
    import onnxruntime
    import torch

    from training.data.dataset import load_split
    from training.model.checkpoint import file_sha256, preprocess_spec, read_metadata
    from training.reports.metrics import classification_metrics

    checkpoint = Path(checkpoint)
    meta = read_metadata(checkpoint)
    spec, classes = preprocess_spec(meta), list(meta["classes"])
    ds = load_split(data, seed=seed)
    train, val = ds.split("train"), ds.split("val")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(train), size=min(images, len(train)), replace=False))
    calib = _arrays(ds, [train[i] for i in pick], spec)
    xv = _arrays(ds, val, spec)
    check = val[:: max(1, len(val) // CHECK_IMAGES)][:CHECK_IMAGES]
    yv = [classes.index(s.label) for s in val]

    def score(logits: np.ndarray, ref: np.ndarray | None = None) -> dict:
        m = classification_metrics(yv, logits.argmax(1).tolist(), classes)
        out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        if ref is not None:
            out["agreement"] = float((logits.argmax(1) == ref.argmax(1)).mean())
        return out

    fp32 = cached_onnx(checkpoint, precision="fp32")
    ref = onnx_logits(fp32, xv)
    report = {"fp32": score(ref), "methods": {}, "images": len(calib), "val": len(val)}
    method, payload = _best_method(fp32, methods, calib, xv, ref, score, report)
    payload["sortline"] = {
        "checkpoint_sha256": file_sha256(checkpoint),
        "method": method,
        "images": len(calib),
        "seed": seed,
        "data": str(data),
        "val": report["methods"][method],
        **(
            {"unfamiliar_threshold": report["methods"][method]["unfamiliar_threshold"]}
            if "unfamiliar_threshold" in report["methods"][method]
            else {}
        ),
        "fp32_val": report["fp32"],
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "check_images": encode_check_images([_image(ds, s) for s in check], spec),
    }
    out = calibration_path(checkpoint)
    out.write_text(json.dumps(payload, sort_keys=True))
    report.update(method=method, path=str(out))
    return report
