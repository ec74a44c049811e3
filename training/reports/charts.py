"""Charts as PNG files and self-contained HTML pages that embed them (no torch here).

Every page is one HTML file with inline CSS and its PNGs embedded as base64 data URIs, so it
opens anywhere, offline, with no external asset and no script.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
figure{margin:.6em 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;text-align:center}
.row{display:flex;flex-wrap:wrap;gap:1em}.row figure{flex:1 1 300px;max-width:560px}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}
.warn{color:#a40000}.ok{color:#0a6e0a}
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- charts


def bar_chart(
    values: Mapping[str, float],
    path: str | Path,
    *,
    title: str,
    ylabel: str = "",
    annotate: bool = True,
) -> Path:
    """A bar per key, in the mapping's order."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names, vals = list(values), [values[k] for k in values]
    bars = ax.bar(range(len(names)), vals, color="#4c78a8")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if annotate:
        for b, v in zip(bars, vals, strict=True):
            text = f"{v:g}" if isinstance(v, int | np.integer) else f"{v:.3g}"
            ax.annotate(
                text,
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=9,
            )
    return _save(fig, path)


def histogram(
    data: Sequence[float],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    bins: int | Sequence[float] = 20,
    vline: float | None = None,
) -> Path:
    """A histogram of *data*, with an optional vertical marker (a threshold)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(data):
        ax.hist(np.asarray(data, dtype=float), bins=bins, color="#4c78a8", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if vline is not None:
        ax.axvline(vline, color="#d62728", linestyle="--", label=f"{vline:g}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    return _save(fig, path)


def box_by_class(
    values: Mapping[str, Sequence[float]], path: str | Path, *, title: str, ylabel: str
) -> Path:
    """One box plot per class."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(values)
    ax.boxplot([np.asarray(values[k], dtype=float) for k in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def scatter(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """A scatter plot with one colour per series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, (x, y) in points.items():
        ax.scatter(x, y, s=8, alpha=0.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if points:
        ax.legend(fontsize=8, markerscale=2)
    return _save(fig, path)


def confusion_png(
    confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, *, title: str
) -> Path:
    """A confusion matrix (rows true, columns predicted) with counts in the cells."""
    plt = _plt()
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    hi = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if hi and cm[i, j] > hi / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color)
    ax.set_title(title)
    return _save(fig, path)


def curves_png(history: Sequence[dict], path: str | Path) -> Path | None:
    """Loss (train, val) and accuracy/macro-F1 per epoch, from a run's history rows."""
    if not history:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [r.get("epoch") for r in history]
    for key, ax in (
        ("train_loss", a1),
        ("val_loss", a1),
        ("train_acc", a2),
        ("val_acc", a2),
        ("val_macro_f1", a2),
    ):
        if all(isinstance(r.get(key), int | float) for r in history):
            ax.plot(ep, [r[key] for r in history], label=key.replace("_", " "))
    for ax in (a1, a2):
        ax.set_xlabel("epoch")
        ax.legend()
    return _save(fig, path)


def image_grid(
    rows: Sequence[tuple[str, Sequence[tuple[Image.Image | None, str]]]],
    path: str | Path,
    *,
    cols: int | None = None,
    cell: float = 2.2,
) -> Path:
    """A grid of photos: one row per (row title, [(image or None, caption), ...])."""
    plt = _plt()
    cols = cols or max([len(items) for _, items in rows] + [1])
    nrows = max(1, len(rows))
    fig, axes = plt.subplots(
        nrows, cols, figsize=(cell * cols, (cell + 0.5) * nrows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r, (row_title, items) in enumerate(rows):
        for c, (img, caption) in enumerate(items[:cols]):
            ax = axes[r, c]
            if img is None:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(img)
            ax.set_title(caption, fontsize=8)
        if row_title:
            axes[r, 0].text(
                -0.08,
                0.5,
                row_title,
                rotation=90,
                ha="right",
                va="center",
                transform=axes[r, 0].transAxes,
                fontsize=11,
            )
    return _save(fig, path)


def gallery(items: Sequence[tuple[Image.Image | None, str]], path: str | Path, cols: int = 6):
    """Photos in rows of *cols*, each with a caption."""
    rows = [("", items[i : i + cols]) for i in range(0, len(items), cols)] or [("", [])]
    return image_grid(rows, path, cols=cols)


def thumbnail(img: Image.Image, size: int = 160) -> Image.Image:
    """A copy no larger than *size* on its longer side."""
    img = img.copy()
    img.thumbnail((size, size))
    return img


# ---------------------------------------------------------------- HTML


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(v: object, digits: int = 3) -> str:
    """A table cell: floats to *digits* decimals, None as a dash."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


class Page:
    """A self-contained HTML page built section by section."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.parts: list[str] = [f"<h1>{esc(title)}</h1>"]
        self.parts.append(
            f'<p class="meta">{esc(subtitle)}{" &middot; " if subtitle else ""}'
            f"generated by sortline, {made}</p>"
        )

    def h2(self, text: str) -> Page:
        self.parts.append(f"<h2>{esc(text)}</h2>")
        return self

    def p(self, text: str, cls: str = "") -> Page:
        attr = f' class="{esc(cls)}"' if cls else ""
        self.parts.append(f"<p{attr}>{esc(text)}</p>")
        return self

    def pre(self, text: str) -> Page:
        self.parts.append(f"<pre>{esc(text)}</pre>")
        return self

    def table(self, header: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1) -> Page:
        """A table; the first *left* columns are left-aligned (names)."""

        def cell(tag: str, i: int, v: object) -> str:
            cls = ' class="l"' if i < left else ""
            return f"<{tag}{cls}>{esc(fmt(v))}</{tag}>"

        out = ["<table><tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"]
        out += ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows]
        self.parts.append("".join(out) + "</table>")
        return self

    def figure(self, png: str | Path, caption: str = "") -> Page:
        self.parts.append(_figure(png, caption))
        return self

    def figures(self, items: Sequence[tuple[str | Path, str]]) -> Page:
        """Figures side by side (wrapping on narrow screens)."""
        self.parts.append('<div class="row">' + "".join(_figure(p, c) for p, c in items) + "</div>")
        return self

    def html(self) -> str:
        body = "\n".join(self.parts)
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(self.title)}</title><link rel="icon" href="data:,">'
            f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.html(), encoding="utf-8")
        log.info("wrote %s", path)
        return path


def data_uri(png: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _figure(png: str | Path, caption: str) -> str:
    alt = caption or Path(png).stem
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'
