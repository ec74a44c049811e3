"""Hostile and unusual image inputs, generated (nothing downloaded), for the reliability tests."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from tests.support.fixtures import jpeg_bytes


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def scene(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """An asymmetric picture: a red block top-left, a blue bar along the bottom."""
    w, h = size
    img = Image.new("RGB", size, (200, 200, 60))
    img.paste((230, 20, 20), (0, 0, w // 2, h // 2))
    img.paste((20, 20, 230), (0, h - h // 4, w, h))
    return img


def truncated_jpeg() -> bytes:
    return jpeg_bytes(7, (96, 96))[:300]


def random_bytes(n: int = 4096, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(n)
    return b"\x00\x01" + data[2:]  # never a valid magic number by chance


def png_rgba() -> bytes:
    img = scene().convert("RGBA")
    img.putalpha(Image.linear_gradient("L").resize(img.size))
    return _save(img, "PNG")


def png_palette(transparency: bool = False) -> bytes:
    img = scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return _save(img, "PNG", **({"transparency": 0} if transparency else {}))


def png_16bit() -> bytes:
    img = Image.linear_gradient("L").resize((64, 48)).point(lambda v: v * 257, "I")
    img = img.convert("I;16")
    data = _save(img, "PNG")
    assert data[24] == 16, "expected a 16-bit PNG"  # IHDR bit depth
    return data


def jpeg_gray() -> bytes:
    return _save(scene().convert("L"), "JPEG", quality=95)


def jpeg_cmyk() -> bytes:
    return _save(scene().convert("CMYK"), "JPEG", quality=95)


def jpeg_upright() -> bytes:
    """The picture stored upright, no EXIF (the reference for :func:`jpeg_exif_rotated`)."""
    return _save(scene((64, 48)), "JPEG", quality=100, subsampling=0)


def jpeg_exif_rotated() -> bytes:
    """The same picture stored turned 90 degrees, with EXIF orientation 6 to turn it back."""
    stored = scene((64, 48)).transpose(Image.Transpose.ROTATE_90)  # 48x64 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return _save(stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())


def gif_animated() -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def webp() -> bytes:
    return _save(scene(), "WEBP", quality=90)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares *width* x *height* pixels (10^10 by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@dataclass(frozen=True)
class Case:
    """One hostile file: its name, its bytes, and what must become of it."""

    name: str
    make: Callable[[], bytes]
    ok: bool  # True: a valid image, classified; False: an error row naming the problem
    error: str = ""  # a fragment the error message must contain (lower case)


FILE_CASES: list[Case] = [
    Case("truncated.jpg", truncated_jpeg, False, "truncated"),
    Case("empty.jpg", lambda: b"", False, "empty file"),
    Case("random.jpg", random_bytes, False, "not an image"),
    Case("text.jpg", lambda: b"just some text, not a photo\n", False, "content is text"),
    Case("page.jpg", lambda: b"<!doctype html><html><body>hi</body></html>", False, "html"),
    Case("rgba.png", png_rgba, True),
    Case("palette.png", png_palette, True),
    Case("palette-transparent.png", lambda: png_palette(True), True),
    Case("sixteen.png", png_16bit, True),
    Case("gray.jpg", jpeg_gray, True),
    Case("cmyk.jpg", jpeg_cmyk, True),
    Case("exif-rotated.jpg", jpeg_exif_rotated, True),
    Case("animated.gif", gif_animated, True),
    Case("photo.webp", webp, True),
    Case("bomb.png", png_bomb, False, "decompression bomb"),
    Case("huge.png", lambda: png_bomb(9_000, 9_000), False, "too large"),
]


# ------------------------------------------------------------------ raw queue entries


def _envelope(body: bytes | str = b'[[{"v": 1}], {}, {}]', edit=None) -> bytes:
    """A kombu Redis queue entry around *body*, as a producer writes it, changed by *edit*."""
    import base64
    import json
    import uuid

    tid = str(uuid.uuid4())
    env = {
        "body": body if isinstance(body, str) else base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": "worker.tasks.inference.classify_batch",
            "id": tid,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": tid,
            "parent_id": None,
            "eta": None,
            "expires": None,
            "group": None,
        },
        "properties": {
            "correlation_id": tid,
            "delivery_mode": 2,
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "cpu"},
            "priority": 0,
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    if edit is not None:
        edit(env)
    return json.dumps(env).encode()


def _set(part: str | None, key: str, value=None, *, drop: bool = False):
    """An *edit* for :func:`_envelope`: set or drop one key of the entry or of one part."""

    def edit(env: dict) -> None:
        target = env if part is None else env[part]
        if drop:
            del target[key]
        else:
            target[key] = value

    return edit


# Entries written straight into a queue list (LPUSH) by anyone who can reach Redis. None is a
# task the worker can run; each must be dropped (logged, counted), the worker unharmed.
RAW_MESSAGES: dict[str, Callable[[], bytes]] = {
    "not-json": lambda: b"{not json",
    "binary": lambda: random_bytes(64),
    "json-list": lambda: b"[1, 2, 3]",
    "json-string": lambda: b'"hello"',
    "json-number": lambda: b"42",
    "json-null": lambda: b"null",
    "empty-object": lambda: b"{}",
    "no-properties": lambda: _envelope(edit=_set(None, "properties", drop=True)),
    "properties-list": lambda: _envelope(edit=_set(None, "properties", [1])),
    "no-delivery-tag": lambda: _envelope(edit=_set("properties", "delivery_tag", drop=True)),
    "delivery-info-string": lambda: _envelope(edit=_set("properties", "delivery_info", "x")),
    "body-encoding-unknown": lambda: _envelope(edit=_set("properties", "body_encoding", "rot13")),
    "bad-base64-body": lambda: _envelope("!!! not base64 ~~~"),
    "body-not-json": lambda: _envelope(b"{not json"),
    "body-not-utf8": lambda: _envelope(b"\xff\xfe\xfd"),
    "body-a-string": lambda: _envelope(b'"just a string"'),
    "body-wrong-shape": lambda: _envelope(b'{"args": 1}'),
    "body-number": lambda: _envelope(b"7"),
    "headers-list": lambda: _envelope(edit=_set(None, "headers", [1, 2])),
    "headers-string": lambda: _envelope(edit=_set(None, "headers", "x")),
    "headers-no-id": lambda: _envelope(edit=_set("headers", "id", drop=True)),
    "headers-id-object": lambda: _envelope(edit=_set("headers", "id", {"a": 1})),
    "headers-no-task": lambda: _envelope(edit=_set("headers", "task", drop=True)),
    "headers-unknown-task": lambda: _envelope(edit=_set("headers", "task", "os.system")),
    "headers-task-list": lambda: _envelope(edit=_set("headers", "task", ["x"])),
    "headers-bad-eta": lambda: _envelope(edit=_set("headers", "eta", "not a date")),
    "headers-bad-expires": lambda: _envelope(edit=_set("headers", "expires", [1, 2])),
    "headers-bad-timelimit": lambda: _envelope(edit=_set("headers", "timelimit", "abc")),
    "headers-bad-retries": lambda: _envelope(edit=_set("headers", "retries", "many")),
    "headers-bad-compression": lambda: _envelope(
        edit=_set("headers", "compression", "application/x-nope")
    ),
    "pickle-content-type": lambda: _envelope(
        b"\x80\x04garbage", edit=_set(None, "content-type", "application/x-python-serialize")
    ),
    "unknown-content-type": lambda: _envelope(edit=_set(None, "content-type", "text/x-nope")),
    "content-type-number": lambda: _envelope(edit=_set(None, "content-type", 5)),
    "content-encoding-unknown": lambda: _envelope(edit=_set(None, "content-encoding", "x-nope")),
}
