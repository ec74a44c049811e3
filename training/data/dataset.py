"""The dataset: ImageFolder scan, near-duplicate groups, a deterministic split, the manifest.

The split is stratified by class and keeps every near-duplicate group (64-bit DCT perceptual
hash within Hamming distance 4) and every set of byte-identical files on one side, so copies
of one photo never sit in both training and test. Corrupt images are reported and skipped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sortline.errors import ConfigError, SortlineError
from training.model.imaging import ImageError, decode_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
PHASH_MAX_DISTANCE = 4


class DatasetError(SortlineError, ValueError):
    """A data directory that cannot be used; the message says why."""


@dataclass
class Sample:
    """One image of the dataset."""

    file: str  # relative to the data root, "class/name.jpg"
    label: str
    sha256: str
    phash: int = 0
    split: str = ""
    group: int = -1


@dataclass
class Dataset:
    """The scanned dataset: samples in a fixed order, classes, and what was skipped."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def label_index(self, s: Sample) -> int:
        return self.classes.index(s.label)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for sp in SPLITS:
            c = Counter(s.label for s in self.samples if s.split == sp)
            out[sp] = {k: c.get(k, 0) for k in self.classes}
        return out


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash: 32x32 greyscale, DCT, top-left 8x8 against their median."""
    from scipy.fft import dctn

    g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(g, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _scan_one(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    img = decode_image(data, draft=(64, 64))
    return hashlib.sha256(data).hexdigest(), phash(img)


def class_folders(root: Path) -> list[str]:
    """The class names of an ImageFolder tree (its sub-folders, sorted), or :class:`DatasetError`."""
    if not root.is_dir():
        raise DatasetError(f"data directory not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(
            f"{root} has no class folders; expected ImageFolder layout root/CLASS/*.jpg"
        )
    return classes


def scan_imagefolder(root: str | Path, *, allow_empty: bool = False) -> Dataset:
    """Read an ImageFolder tree (one folder per class); hash every image, skip corrupt ones.

    With *allow_empty*, class folders without images are allowed (a review export's)."""
    root = Path(root)
    classes = class_folders(root)
    samples, skipped = [], []
    for label in classes:
        files = sorted(
            p
            for p in (root / label).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        for p in files:
            rel = p.relative_to(root).as_posix()
            try:
                sha, ph = _scan_one(p)
            except (ImageError, OSError) as e:
                log.warning("skipping %s: %s", rel, e)
                skipped.append((rel, str(e)))
                continue
            samples.append(Sample(rel, label, sha, ph))
    if not samples:
        raise DatasetError(f"{root} holds no readable images")
    empty = [c for c in classes if not any(s.label == c for s in samples)]
    if empty and not allow_empty:
        raise DatasetError(f"class folders without readable images: {', '.join(empty)}")
    return Dataset(root, classes, samples, skipped)


def duplicate_groups(samples: list[Sample], max_distance: int = PHASH_MAX_DISTANCE) -> list[int]:
    """Group index per sample: connected components of (same sha256) or (pHash distance <= d)."""
    n = len(samples)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    by_sha: dict[str, int] = {}
    for i, s in enumerate(samples):
        if s.sha256 in by_sha:
            union(by_sha[s.sha256], i)
        else:
            by_sha[s.sha256] = i
    hashes = np.array([s.phash for s in samples], dtype=np.uint64)
    for i in range(n - 1):
        dist = np.bitwise_count(hashes[i + 1 :] ^ hashes[i])
        for j in np.nonzero(dist <= max_distance)[0]:
            union(i, i + 1 + int(j))
    roots = [find(i) for i in range(n)]
    remap = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return [remap[r] for r in roots]


def assign_splits(
    dataset: Dataset, *, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> Dataset:
    """Set ``split`` and ``group`` on every sample: stratified by class, groups kept whole.

    Deterministic for a given file list, hashes, fractions and seed. Groups are visited in a
    seeded order (largest first) and each goes to the split furthest below its target share
    for the group's majority class.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, not {fractions}")
    samples = sorted(dataset.samples, key=lambda s: s.file)
    groups = duplicate_groups(samples)
    members: dict[int, list[Sample]] = defaultdict(list)
    for s, g in zip(samples, groups, strict=True):
        s.group = g
        members[g].append(s)
    class_total = Counter(s.label for s in samples)
    filled = {sp: Counter() for sp in SPLITS}
    order = list(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: big groups first, then seeded order
    for g in order:
        ms = members[g]
        label = Counter(s.label for s in ms).most_common(1)[0][0]

        def deficit(i: int, label: str = label) -> float:
            return fractions[i] * class_total[label] - filled[SPLITS[i]][label]

        best = max(range(3), key=lambda i: (deficit(i), -i))
        for s in ms:
            s.split = SPLITS[best]
            filled[SPLITS[best]][s.label] += 1
    dataset.samples = samples
    n_groups = sum(1 for g in members.values() if len(g) > 1)
    log.info("split %s; %d duplicate groups kept whole", dataset.counts(), n_groups)
    return dataset


def load_split(root: str | Path, *, seed: int = 0, fractions=(0.7, 0.15, 0.15)) -> Dataset:
    """Scan *root* and assign the deterministic split."""
    return assign_splits(scan_imagefolder(root), fractions=fractions, seed=seed)


MANIFEST_FIELDS = ("file", "class", "sha256", "split", "group")


def manifest_rows(dataset: Dataset) -> list[dict]:
    return [
        {"file": s.file, "class": s.label, "sha256": s.sha256, "split": s.split, "group": s.group}
        for s in dataset.samples
    ]


def manifest_bytes(dataset: Dataset) -> bytes:
    """The manifest as CSV bytes (its sha256 identifies the split)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(manifest_rows(dataset))
    return buf.getvalue().encode()


def manifest_sha256(dataset: Dataset) -> str:
    return hashlib.sha256(manifest_bytes(dataset)).hexdigest()


def write_manifest(dataset: Dataset, run_dir: str | Path) -> str:
    """Write manifest.csv and manifest.json (with counts and skipped files); return the sha256."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    raw = manifest_bytes(dataset)
    (run_dir / "manifest.csv").write_bytes(raw)
    sha = hashlib.sha256(raw).hexdigest()
    info = {
        "root": str(dataset.root),
        "classes": dataset.classes,
        "manifest_sha256": sha,
        "counts": dataset.counts(),
        "skipped": [{"file": f, "reason": r} for f, r in dataset.skipped],
        "duplicate_groups": sum(
            1 for n in Counter(s.group for s in dataset.samples).values() if n > 1
        ),
        "samples": manifest_rows(dataset),
    }
    (run_dir / "manifest.json").write_text(json.dumps(info, indent=1))
    return sha


def read_manifest(path: str | Path, root: str | Path) -> Dataset:
    """Rebuild a :class:`Dataset` from a manifest.csv (reusing a split exactly)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    samples = [
        Sample(r["file"], r["class"], r["sha256"], 0, r["split"], int(r.get("group") or -1))
        for r in rows
    ]
    return Dataset(Path(root), sorted({s.label for s in samples}), samples)


# ---------------------------------------------------------------- images in memory


def load_resized(
    dataset: Dataset, samples: list[Sample], *, short_side: int = 256, cache_dir: Path | None = None
) -> list[np.ndarray]:
    """Decode and resize (shorter side) each sample once; uint8 HWC arrays, cached on disk."""
    from training.model.preprocess import _RESAMPLE

    out: list[np.ndarray] = []
    cdir = None
    if cache_dir is not None:
        cdir = Path(cache_dir) / f"resized{short_side}"
        cdir.mkdir(parents=True, exist_ok=True)
    for s in samples:
        f = cdir / f"{s.sha256}.npy" if cdir else None
        if f is not None and f.exists():
            out.append(np.load(f))
            continue
        img = decode_image((dataset.root / s.file).read_bytes(), draft=(short_side, short_side))
        w, h = img.size
        k = short_side / min(w, h)
        img = img.resize((round(w * k), round(h * k)), _RESAMPLE["bilinear"], reducing_gap=None)
        arr = np.asarray(img, dtype=np.uint8)
        if f is not None:
            np.save(f, arr)
        out.append(arr)
    return out


def asdict_sample(s: Sample) -> dict:
    return asdict(s)


def link_split(dataset: Dataset, split: str, out: str | Path) -> Path:
    """An ImageFolder of one split (symbolic links), for ``sortline evaluate --data``."""
    out = Path(out)
    for s in dataset.split(split):
        dst = out / s.file
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to((dataset.root / s.file).resolve())
    return out


def checkpoint_split(meta: dict, data: str | Path | None = None) -> Dataset:
    """The train/val/test split a checkpoint was trained on, rebuilt from *data* (else the
    folder its metadata records); its manifest must match the checkpoint's."""
    root = data or (meta.get("training") or {}).get("data")
    if not root or not Path(root).is_dir():
        raise ConfigError(
            f"the model's training data {root or '(not recorded)'} is not here; "
            "pass --data DIR (the ImageFolder it was trained on)"
        )
    ds = load_split(root, seed=int((meta.get("training") or {}).get("split_seed", 0)))
    if meta.get("manifest_sha256") and manifest_sha256(ds) != meta["manifest_sha256"]:
        raise ConfigError(
            f"{root} does not split into the model's training manifest "
            "(different images); pass --data with the dataset it was trained on"
        )
    return ds
