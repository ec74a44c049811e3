"""Safe image decoding shared by training and the worker (no torch here)."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from sortline.errors import SortlineError

DEFAULT_MAX_PIXELS = 50_000_000
# Photo formats only: PIL's other plugins (EPS runs Ghostscript, and dozens of rare formats)
# are never tried on untrusted bytes.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP")  # JPEG includes MPO (phone photos)


class ImageError(SortlineError, ValueError):
    """An input that cannot be turned into an RGB image; the message names the problem."""


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] | None = None
) -> Image.Image:
    """Decode *data* into an upright RGB image, or raise :class:`ImageError`.

    The declared size is checked before any pixel is decoded (decompression bombs), EXIF
    rotation is applied, animations give their first frame, alpha is composited on white,
    and palette, grayscale, 16-bit and CMYK images become 8-bit RGB. With *draft*, JPEGs
    are decoded at the smallest DCT scale that still covers that size.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(
            f"not an image: content is {_sniff(data)}, not a supported image format "
            f"({', '.join(FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image refused: {e}") from None
    except Exception as e:
        raise ImageError(f"corrupt or truncated image: cannot read its header ({e})") from None

    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(
            f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            "(SORTLINE_MAX_IMAGE_PIXELS)"
        )
    try:
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()  # first frame of an animation
        upright = _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except Exception as e:  # truncated or corrupt data, unsupported mode
        raise ImageError(f"corrupt or truncated image ({img.format}): {e}") from None
    return upright


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 255 else 255.0) * 255.0).clip(0, 255).astype("uint8")
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _sniff(data: bytes) -> str:
    """A word for what bytes that are no image look like, for the error message."""
    head = data[:256].lstrip()
    for magic, kind in (
        (b"<", "HTML/XML"),
        (b"{", "JSON"),
        (b"%PDF", "PDF"),
        (b"%!PS", "PostScript"),
    ):
        if head.startswith(magic):
            return kind
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "text"
    return "unknown binary data"
