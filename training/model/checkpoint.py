"""The checkpoint format: one safetensors file whose header carries JSON metadata.

Metadata (under the header key ``sortline``): format, name, version, arch, classes,
preprocess (a :class:`PreprocessSpec`), temperature, metrics (each naming its split),
manifest_sha256 and training settings; with ``unfamiliarity`` (method, threshold), the
statistics of :mod:`training.model.unfamiliarity` are stored as float32 tensors named
``unfamiliarity.*`` beside the weights. Loading never executes code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from sortline.errors import SortlineError

FORMAT = "sortline-checkpoint/1"
META_KEY = "sortline"


class CheckpointError(SortlineError, ValueError):
    """A file that is not a usable sortline checkpoint; the message says why."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's metadata from its header alone (no torch, no tensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise CheckpointError(f"{path}: header length {n} is not plausible")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a safetensors file: {e}") from None
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise CheckpointError(f"{path} has no sortline metadata; was it saved by sortline?")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    return meta


def model_version(meta: dict[str, Any]) -> str:
    """The string stored with every result: ``name:version``."""
    return f"{meta.get('name', 'model')}:{meta.get('version', '0')}"


def save_checkpoint(
    path: str | Path,
    model,
    meta: dict[str, Any],
    *,
    half: bool = False,
    unfamiliarity: dict[str, Any] | None = None,
) -> str:
    """Write *model*'s weights and *meta* to *path*; return the file's sha256.

    With *half*, floating-point tensors are stored as float16 (half the size); they are
    loaded back as float32. *unfamiliarity* (arrays) is stored as float32 tensors.
    """
    import torch
    from safetensors.torch import save_file

    from training.model.unfamiliarity import PREFIX

    for key in ("arch", "classes", "preprocess"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    meta = {"format": FORMAT, "temperature": 1.0, **meta}
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous()
    for k, v in (unfamiliarity or {}).items():
        state[PREFIX + k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    return file_sha256(path)


def verify_sha256(path: str | Path, expected: str | None) -> None:
    """Refuse a checkpoint whose bytes differ from the registry's sha256 (None: no check)."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 {actual[:12]}… does not match the registry's "
            f"{expected[:12]}…; the file was changed after it was registered"
        )


def load_checkpoint(path: str | Path, *, expected_sha256: str | None = None):
    """Build the model a checkpoint describes and load its weights; return (model, meta).

    With *expected_sha256* (from the registry) a file whose bytes differ is refused.
    """
    from safetensors.torch import load_file

    from training.model.factory import create_model
    from training.model.unfamiliarity import PREFIX

    meta = read_metadata(path)
    verify_sha256(path, expected_sha256)
    model = create_model(meta["arch"], num_classes=len(meta["classes"]), pretrained="none")
    try:
        state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(PREFIX)}
        ref = model.state_dict()
        state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"{path}: weights do not fit {meta['arch']}: {e}") from None
    model.eval()
    return model, meta


def read_unfamiliarity(path: str | Path) -> dict[str, np.ndarray] | None:
    """The unfamiliarity statistics stored in a checkpoint, or None (NumPy, no torch)."""
    from safetensors import safe_open

    from training.model.unfamiliarity import PREFIX

    with safe_open(str(path), framework="numpy") as f:
        keys = [k for k in f.keys() if k.startswith(PREFIX)]  # noqa: SIM118
        return {k.removeprefix(PREFIX): f.get_tensor(k) for k in keys} or None


def preprocess_spec(meta: dict[str, Any]):
    """The checkpoint's evaluation preprocessing."""
    from training.model.preprocess import PreprocessSpec

    return PreprocessSpec.from_dict(meta["preprocess"])
