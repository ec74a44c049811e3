"""Exploratory analysis of an ImageFolder dataset: PNG charts, a JSON summary, one HTML page.

What it measures, per image: decodability, size and aspect ratio, the bounding box of the
object against the background, brightness and contrast, the sha256 of the bytes and the
64-bit DCT perceptual hash of :func:`training.data.dataset.phash`. Across images: class counts and
imbalance, exact duplicates (same bytes) and near-duplicate groups (the grouping of
:func:`training.data.dataset.duplicate_groups`), with those spanning two classes called out.

The foreground box is a heuristic for photos of one object on a plain background (TrashNet's
white posterboard): a pixel is foreground when it lies on an edge or is more coloured than the
image border (see :func:`foreground_box`), and the box spans the rows and columns where more
than ``FG_LINE_SHARE`` of the pixels are foreground.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.data.dataset import (
    IMAGE_SUFFIXES,
    PHASH_MAX_DISTANCE,
    DatasetError,
    Sample,
    class_folders,
    duplicate_groups,
    phash,
)
from training.model.imaging import ImageError, decode_image
from training.reports import charts as viz

log = logging.getLogger(__name__)

ANALYSIS_SIZE = (64, 64)  # JPEG draft target: the same decode as training.data.dataset's hashing
ANALYSIS_SIDE = 128  # foreground and light are measured at most this large (TrashNet: 96x128)
FG_EDGE = 12.0  # luma gradient (per pixel of the ~96x128 analysis image) of an edge
FG_CHROMA = 40.0  # chroma (max - min of RGB) above the background's
FG_LINE_SHARE = 0.03  # a row/column belongs to the box above this share of foreground pixels
SAMPLES_PER_CLASS = 6


@dataclass
class ImageStats:
    """What the EDA measured for one file."""

    file: str  # relative to the data root
    label: str
    bytes: int
    sha256: str
    ok: bool = True
    error: str = ""
    width: int = 0
    height: int = 0
    aspect: float = 0.0  # width / height
    phash: str = ""  # 16 hex digits
    brightness: float = 0.0  # mean luma, 0-255
    contrast: float = 0.0  # RMS contrast: standard deviation of luma, 0-255
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in original pixels
    bbox_width: int = 0
    bbox_height: int = 0
    bbox_area: int = 0
    bbox_coverage: float = 0.0  # box area / frame area
    fg_fraction: float = 0.0  # foreground pixels / all pixels


def _original_size(data: bytes) -> tuple[int, int]:
    """Width and height as displayed (EXIF rotation applied), read from the header."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def foreground_box(img: Image.Image) -> tuple[tuple[int, int, int, int] | None, float]:
    """Foreground box (x0, y0, x1, y1, exclusive ends) of a small RGB image, and the share of
    foreground pixels.

    Foreground: pixels on an edge (luma gradient above ``FG_EDGE``) or more coloured than the
    background (chroma above the border's median plus ``FG_CHROMA``). Smooth shading of the
    background has weak gradients and no colour, so it stays out of the box.
    """
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    gy, gx = np.gradient(a.mean(axis=2))
    chroma = a.max(axis=2) - a.min(axis=2)
    border = np.concatenate(
        [chroma[:2].ravel(), chroma[-2:].ravel(), chroma[:, :2].ravel(), chroma[:, -2:].ravel()]
    )
    mask = (np.hypot(gx, gy) > FG_EDGE) | (chroma > np.median(border) + FG_CHROMA)
    rows = np.nonzero(mask.mean(axis=1) > FG_LINE_SHARE)[0]
    cols = np.nonzero(mask.mean(axis=0) > FG_LINE_SHARE)[0]
    if len(rows) == 0 or len(cols) == 0:
        return None, float(mask.mean())
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1), float(mask.mean())


def analyse_file(root: Path, rel: str, label: str) -> ImageStats:
    """Measure one file; a file that does not decode gets ``ok=False`` and the reason."""
    data = (root / rel).read_bytes()
    st = ImageStats(rel, label, len(data), hashlib.sha256(data).hexdigest())
    try:
        img = decode_image(data, draft=ANALYSIS_SIZE)
        w, h = _original_size(data)
    except (ImageError, OSError) as e:
        st.ok, st.error = False, str(e)
        return st
    st.width, st.height, st.aspect = w, h, round(w / h, 4)
    st.phash = f"{phash(img):016x}"
    if max(img.size) > ANALYSIS_SIDE:  # PNGs and others have no draft mode
        img = img.copy()
        img.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BILINEAR)
    luma = np.asarray(img.convert("L"), dtype=np.float32)
    st.brightness, st.contrast = round(float(luma.mean()), 2), round(float(luma.std()), 2)
    box, fg = foreground_box(img)
    st.fg_fraction = round(fg, 4)
    if box is not None:
        sx, sy = w / img.width, h / img.height
        x0, y0, x1, y1 = box
        st.bbox = (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
        st.bbox_width = st.bbox[2] - st.bbox[0]
        st.bbox_height = st.bbox[3] - st.bbox[1]
        st.bbox_area = st.bbox_width * st.bbox_height
        st.bbox_coverage = round(st.bbox_area / (w * h), 4)
    return st


def list_files(root: Path) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Class names, (file, class) pairs of image files, and other files that were ignored."""
    classes = class_folders(root)
    files, ignored = [], []
    for c in classes:
        for p in sorted((root / c).rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            rel = p.relative_to(root).as_posix()
            (files if p.suffix.lower() in IMAGE_SUFFIXES else ignored).append(rel)
    files = [(f, f.split("/", 1)[0]) for f in files]
    return classes, files, ignored


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=float)
    return {
        "n": int(a.size),
        "min": round(float(a.min()), 4),
        "max": round(float(a.max()), 4),
        "mean": round(float(a.mean()), 4),
        "median": round(float(np.median(a)), 4),
        "std": round(float(a.std()), 4),
    }


def summarise(root: Path, classes: list[str], stats: list[ImageStats], ignored: list[str]) -> dict:
    """The JSON summary: counts, sizes, foreground, light, integrity, duplicates."""
    ok = [s for s in stats if s.ok]
    counts = Counter(s.label for s in ok)
    class_counts = {c: counts.get(c, 0) for c in classes}
    nonzero = [n for n in class_counts.values() if n]
    by_class: dict[str, list[ImageStats]] = defaultdict(list)
    for s in ok:
        by_class[s.label].append(s)

    def per_class(attr: str) -> dict:
        # the box figures only over images where a foreground was found
        keep = (lambda s: s.bbox is not None) if attr.startswith("bbox") else (lambda s: True)
        return {
            "all": _stats([getattr(s, attr) for s in ok if keep(s)]),
            **{c: _stats([getattr(s, attr) for s in by_class[c] if keep(s)]) for c in classes},
        }

    sizes = Counter(f"{s.width}x{s.height}" for s in ok)
    orient = Counter(
        "portrait" if s.height > s.width else "landscape" if s.width > s.height else "square"
        for s in ok
    )

    # exact duplicates: the same bytes, over every file (decodable or not)
    by_sha: dict[str, list[ImageStats]] = defaultdict(list)
    for s in stats:
        by_sha[s.sha256].append(s)
    exact = [
        {
            "sha256": sha,
            "files": [m.file for m in ms],
            "classes": sorted({m.label for m in ms}),
            "cross_class": len({m.label for m in ms}) > 1,
        }
        for sha, ms in by_sha.items()
        if len(ms) > 1
    ]
    exact.sort(key=lambda d: d["files"][0])

    # near duplicates: the grouping the training split uses (same bytes or pHash <= 4)
    samples = [Sample(s.file, s.label, s.sha256, int(s.phash, 16)) for s in ok]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(duplicate_groups(samples) if samples else []):
        groups[g].append(i)
    near = []
    for members in groups.values():
        if len(members) < 2:
            continue
        ms = [samples[i] for i in members]
        hashes = np.array([m.phash for m in ms], dtype=np.uint64)
        dist = [
            int(np.bitwise_count(hashes[i] ^ hashes[j]))
            for i in range(len(ms))
            for j in range(i + 1, len(ms))
        ]
        near.append(
            {
                "files": [m.file for m in ms],
                "classes": sorted({m.label for m in ms}),
                "cross_class": len({m.label for m in ms}) > 1,
                "exact_only": len({m.sha256 for m in ms}) == 1,
                "max_distance": max(dist),
            }
        )
    near.sort(key=lambda d: d["files"][0])

    return {
        "root": str(root),
        "n_files": len(stats),
        "n_images": len(ok),
        "classes": classes,
        "class_counts": class_counts,
        "imbalance_ratio": round(max(nonzero) / min(nonzero), 3) if nonzero else None,
        "sizes": dict(sizes.most_common()),
        "orientation": dict(orient),
        "width": per_class("width"),
        "height": per_class("height"),
        "aspect": per_class("aspect"),
        "file_bytes": per_class("bytes"),
        "bbox_width": per_class("bbox_width"),
        "bbox_height": per_class("bbox_height"),
        "bbox_area": per_class("bbox_area"),
        "bbox_coverage": per_class("bbox_coverage"),
        "no_foreground": [s.file for s in ok if s.bbox is None],
        "brightness": per_class("brightness"),
        "contrast": per_class("contrast"),
        "integrity": {
            "unreadable": [{"file": s.file, "reason": s.error} for s in stats if not s.ok],
            "ignored_files": ignored,
        },
        "exact_duplicates": {
            "groups": len(exact),
            "cross_class": sum(d["cross_class"] for d in exact),
            "items": exact,
        },
        "near_duplicates": {
            "method": f"64-bit DCT pHash, Hamming distance <= {PHASH_MAX_DISTANCE}, "
            "or identical bytes",
            "groups": len(near),
            "groups_not_byte_identical": sum(not d["exact_only"] for d in near),
            "cross_class": sum(d["cross_class"] for d in near),
            "images_in_groups": sum(len(d["files"]) for d in near),
            "items": near,
        },
    }


def run_eda(
    data_dir: str | Path,
    out: str | Path,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    samples_per_class: int = SAMPLES_PER_CLASS,
) -> dict:
    """Analyse *data_dir* and write charts, ``eda.json``, ``images.csv`` and ``eda.html`` in *out*.

    Returns the summary (also in ``eda.json``).
    """
    root, out = Path(data_dir), Path(out)
    t0 = time.perf_counter()
    classes, files, ignored = list_files(root)
    if not files:
        raise DatasetError(f"{root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    stats = []
    for i, (rel, label) in enumerate(files):
        stats.append(analyse_file(root, rel, label))
        if on_progress:
            on_progress(i + 1, len(files))
    summary = summarise(root, classes, stats, ignored)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(stats, out / "images.csv")
    charts = _charts(root, classes, stats, summary, out, samples_per_class)
    summary["charts"] = {k: p.name for k, p in charts.items()}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "eda.json").write_text(json.dumps(summary, indent=1))
    _page(summary, charts).write(out / "eda.html")
    log.info("EDA of %s: %d images in %.1f s", root, summary["n_images"], summary["seconds"])
    return summary


def _write_csv(stats: list[ImageStats], path: Path) -> None:
    fields = list(asdict(stats[0]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for s in stats:
            d = asdict(s)
            d["bbox"] = " ".join(map(str, s.bbox)) if s.bbox else ""
            w.writerow(d)


def _thumb(root: Path, s: ImageStats, size: int = 200, box: bool = True) -> Image.Image | None:
    try:
        img = decode_image((root / s.file).read_bytes(), draft=(size, size))
    except (ImageError, OSError):
        return None
    if box and s.bbox:
        k = img.width / s.width
        draw = ImageDraw.Draw(img)
        draw.rectangle([round(v * k) for v in s.bbox], outline=(230, 30, 30), width=2)
    return viz.thumbnail(img, size)


def _charts(
    root: Path, classes: list[str], stats: list[ImageStats], summary: dict, out: Path, k: int
) -> dict[str, Path]:
    ok = [s for s in stats if s.ok]
    by_class = {c: [s for s in ok if s.label == c] for c in classes}
    ch: dict[str, Path] = {}
    ch["class_counts"] = viz.bar_chart(
        summary["class_counts"],
        out / "class_counts.png",
        title=f"images per class (imbalance ratio {summary['imbalance_ratio']})",
        ylabel="images",
    )
    ch["image_sizes"] = viz.scatter(
        {c: ([s.width for s in v], [s.height for s in v]) for c, v in by_class.items()},
        out / "image_sizes.png",
        title="image width and height",
        xlabel="width (px)",
        ylabel="height (px)",
    )
    ch["aspect"] = viz.histogram(
        [s.aspect for s in ok],
        out / "aspect.png",
        title="aspect ratio (width / height)",
        xlabel="width / height",
        bins=30,
    )
    ch["bbox_size"] = viz.scatter(
        {
            c: ([s.bbox_width for s in v if s.bbox], [s.bbox_height for s in v if s.bbox])
            for c, v in by_class.items()
        },
        out / "bbox_size.png",
        title="foreground box width and height",
        xlabel="box width (px)",
        ylabel="box height (px)",
    )
    ch["bbox_coverage"] = viz.box_by_class(
        {c: [s.bbox_coverage for s in v if s.bbox] for c, v in by_class.items()},
        out / "bbox_coverage.png",
        title="foreground box: share of the frame",
        ylabel="box area / image area",
    )
    ch["bbox_coverage_hist"] = viz.histogram(
        [s.bbox_coverage for s in ok if s.bbox],
        out / "bbox_coverage_hist.png",
        title="foreground box coverage, all images",
        xlabel="box area / image area",
        bins=30,
    )
    ch["brightness"] = viz.box_by_class(
        {c: [s.brightness for s in v] for c, v in by_class.items()},
        out / "brightness.png",
        title="brightness per class (mean luma)",
        ylabel="mean luma (0-255)",
    )
    ch["contrast"] = viz.box_by_class(
        {c: [s.contrast for s in v] for c, v in by_class.items()},
        out / "contrast.png",
        title="contrast per class (RMS: std of luma)",
        ylabel="std of luma (0-255)",
    )
    rows = []
    for c in classes:
        v = by_class[c]
        picks = [v[round(i * (len(v) - 1) / max(1, k - 1))] for i in range(k)] if v else []
        picks = list(dict.fromkeys(id(s) for s in picks))
        chosen = [s for s in v if id(s) in picks]
        rows.append((c, [(_thumb(root, s), Path(s.file).name) for s in chosen]))
    ch["samples"] = viz.image_grid(rows, out / "samples.png", cols=k)
    dup_rows = []
    stat_of = {s.file: s for s in stats}
    pairs = sorted(summary["near_duplicates"]["items"], key=lambda d: not d["cross_class"])
    for d in pairs[:12]:
        items = [(_thumb(root, stat_of[f], 140, box=False), f) for f in d["files"][:4]]
        title = ("cross-class " if d["cross_class"] else "") + f"d<={d['max_distance']}"
        dup_rows.append((title, items))
    if dup_rows:
        ch["near_duplicates"] = viz.image_grid(dup_rows, out / "near_duplicates.png", cell=2.0)
    return ch


def _page(s: dict, ch: dict[str, Path]) -> viz.Page:
    classes = s["classes"]
    page = viz.Page(
        f"EDA of {Path(s['root']).name}",
        f"{s['root']}: {s['n_images']} images, {len(classes)} classes, {s['seconds']} s",
    )
    page.h2("Images per class")
    total = max(1, s["n_images"])
    page.table(
        ["class", "images", "share"],
        [(c, n, f"{n / total:.1%}") for c, n in s["class_counts"].items()]
        + [("total", s["n_images"], "100%")],
    )
    page.p(f"Imbalance ratio (largest / smallest class): {s['imbalance_ratio']}")
    page.figure(ch["class_counts"], "images per class")

    page.h2("Image size and aspect ratio")
    page.table(["size (w x h)", "images"], list(s["sizes"].items())[:10])
    page.p("Orientation: " + ", ".join(f"{k} {v}" for k, v in s["orientation"].items()))
    page.table(
        ["measure", "min", "median", "mean", "max", "std"],
        [
            (name, *(s[key]["all"].get(f) for f in ("min", "median", "mean", "max", "std")))
            for name, key in (
                ("width (px)", "width"),
                ("height (px)", "height"),
                ("aspect w/h", "aspect"),
                ("file size (bytes)", "file_bytes"),
            )
        ],
    )
    page.figures([(ch["image_sizes"], "width and height"), (ch["aspect"], "aspect ratio")])

    page.h2("Foreground box (object against the background)")
    page.p(
        "Heuristic: foreground = pixels on an edge (luma gradient over "
        f"{FG_EDGE:g}) or more coloured than the image border (chroma over the border's "
        f"median + {FG_CHROMA:g}), measured at about 96x128; the box spans rows and columns "
        f"with over {FG_LINE_SHARE:.0%} foreground. Red boxes in the sample grid show it."
    )
    page.table(
        [
            "class",
            "box width (median)",
            "box height (median)",
            "box area (median)",
            "coverage mean",
            "coverage median",
        ],
        [
            (
                c,
                s["bbox_width"][c].get("median"),
                s["bbox_height"][c].get("median"),
                s["bbox_area"][c].get("median"),
                s["bbox_coverage"][c].get("mean"),
                s["bbox_coverage"][c].get("median"),
            )
            for c in [*classes, "all"]
        ],
    )
    if s["no_foreground"]:
        page.p(
            f"{len(s['no_foreground'])} images with no foreground found (left out of the "
            "box figures; often an object filling the whole frame): "
            + ", ".join(s["no_foreground"][:20]),
            "warn",
        )
    page.figures(
        [
            (ch["bbox_size"], "box width and height"),
            (ch["bbox_coverage"], "coverage per class"),
            (ch["bbox_coverage_hist"], "coverage, all images"),
        ]
    )

    page.h2("Brightness and contrast")
    page.table(
        ["class", "brightness mean", "brightness std", "contrast mean", "contrast std"],
        [
            (
                c,
                s["brightness"][c].get("mean"),
                s["brightness"][c].get("std"),
                s["contrast"][c].get("mean"),
                s["contrast"][c].get("std"),
            )
            for c in [*classes, "all"]
        ],
    )
    page.figures([(ch["brightness"], "brightness"), (ch["contrast"], "contrast")])

    page.h2("Integrity")
    bad = s["integrity"]["unreadable"]
    if bad:
        page.p(f"{len(bad)} files fail to decode:", "warn")
        page.table(["file", "reason"], [(d["file"], d["reason"]) for d in bad], left=2)
    else:
        page.p(f"All {s['n_files']} image files decode.", "ok")
    if s["integrity"]["ignored_files"]:
        page.p("Ignored (not an image file name): " + ", ".join(s["integrity"]["ignored_files"]))

    page.h2("Exact duplicates (identical bytes)")
    ex = s["exact_duplicates"]
    page.p(
        f"{ex['groups']} sets of identical files, {ex['cross_class']} of them filed under "
        "more than one class.",
        "warn" if ex["cross_class"] else "",
    )
    if ex["items"]:
        page.table(
            ["files", "classes", "cross-class"],
            [
                (" = ".join(d["files"]), ", ".join(d["classes"]), "yes" if d["cross_class"] else "")
                for d in ex["items"]
            ],
            left=3,
        )

    page.h2("Near-duplicates (perceptual hash)")
    nd = s["near_duplicates"]
    page.p(
        f"{nd['groups']} groups ({nd['method']}), {nd['images_in_groups']} images; "
        f"{nd['groups_not_byte_identical']} are not just byte-identical copies; "
        f"{nd['cross_class']} span two classes. Keep each group on one side of a split."
    )
    page.table(
        ["files", "classes", "max distance", "cross-class"],
        [
            (
                " ~ ".join(d["files"]),
                ", ".join(d["classes"]),
                d["max_distance"],
                "yes" if d["cross_class"] else "",
            )
            for d in nd["items"]
        ],
        left=2,
    )
    if "near_duplicates" in ch:
        page.figure(ch["near_duplicates"], "near-duplicate groups (cross-class first, up to 12)")

    page.h2("Samples per class")
    page.figure(ch["samples"], "evenly spaced samples of each class, foreground box in red")
    return page
