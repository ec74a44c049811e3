"""Issue 6: hostile and unusual inputs, one by one, at the decoder, the message schema and read_item."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.support import hostile
from tests.support.fixtures import jpeg_bytes
from training.model.imaging import ImageError, decode_image
from worker.inputs import (
    MAX_ITEMS,
    MAX_POSITION,
    InputError,
    Item,
    MessageError,
    build_message,
    display_ref,
    parse_message,
    read_item,
    salvage,
)

# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("case", hostile.FILE_CASES, ids=lambda c: c.name)
def test_decode_each_case(case):
    data = case.make()
    if case.ok:
        img = decode_image(data)
        assert img.mode == "RGB" and img.width > 0 and img.height > 0
    else:
        with pytest.raises(ImageError) as e:
            decode_image(data)
        assert case.error in str(e.value).lower()


def test_exif_rotation_gives_the_upright_picture():
    img = decode_image(hostile.jpeg_exif_rotated())
    assert img.size == (64, 48)  # stored 48x64, displayed 64x48
    ref = np.asarray(decode_image(hostile.jpeg_upright()), dtype=np.int16)
    assert np.abs(np.asarray(img, dtype=np.int16) - ref).mean() < 3
    r, g, b = img.getpixel((4, 4))
    assert r > 180 and g < 60 and b < 60  # the red block is top-left again


def test_animated_gif_gives_its_first_frame():
    assert decode_image(hostile.gif_animated()).getpixel((5, 5)) == (255, 0, 0)


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = __import__("io").BytesIO()
    img.save(buf, "PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_keeps_its_range():
    img = decode_image(hostile.png_16bit())
    assert img.getpixel((0, 0))[0] < 10 and img.getpixel((63, 47))[0] > 245


@pytest.mark.parametrize(
    ("size", "fragment"),
    [((100_000, 100_000), "decompression bomb"), ((9_000, 9_000), "too large")],
)
def test_bomb_refused_before_decoding(monkeypatch, size, fragment):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as e:
        decode_image(hostile.png_bomb(*size), max_pixels=50_000_000)
    assert fragment in str(e.value).lower()
    assert time.perf_counter() - t0 < 1.0


def test_max_pixels_is_the_configured_limit():
    with pytest.raises(ImageError, match="SORTLINE_MAX_IMAGE_PIXELS"):
        decode_image(jpeg_bytes(1, (100, 100)), max_pixels=100 * 99)
    decode_image(jpeg_bytes(1, (100, 100)), max_pixels=100 * 100)


# ------------------------------------------------------------------ messages


def _msg(**over):
    m = build_message("a" * 32, [{"pos": 0, "path": "/x.jpg"}], time.time())
    m.update(over)
    return m


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ([1, 2], "json object"),
        ("text", "json object"),
        (_msg(v=2), "unknown message schema version 2"),
        (_msg(v=None), "unknown message schema version none"),
        ({k: v for k, v in _msg().items() if k != "v"}, "schema version"),
        ({k: v for k, v in _msg().items() if k != "job_id"}, "job_id"),
        (_msg(job_id=""), "job_id"),
        (_msg(job_id=7), "job_id"),
        ({k: v for k, v in _msg().items() if k != "items"}, "items"),
        (_msg(items=[]), "items"),
        (_msg(items="x"), "items"),
        (_msg(items=["x"]), "item 0 is not an object"),
        (_msg(items=[{"path": "/x"}]), "'pos'"),
        (_msg(items=[{"pos": -1, "path": "/x"}]), "'pos'"),
        (_msg(items=[{"pos": True, "path": "/x"}]), "'pos'"),
        (_msg(items=[{"pos": MAX_POSITION + 1, "path": "/x"}]), "'pos'"),
        (_msg(items=[{"pos": 0}]), "neither 'path' nor 'data'"),
        (_msg(items=[{"pos": 0, "path": 5}]), "neither 'path' nor 'data'"),
        (_msg(items=[{"pos": 0, "path": "/a"}, {"pos": 0, "path": "/b"}]), "repeats"),
        (_msg(items=[{"pos": i, "path": "/a"} for i in range(MAX_ITEMS + 1)]), "at most"),
    ],
)
def test_bad_messages_are_rejected_by_name(raw, fragment):
    with pytest.raises(MessageError) as e:
        parse_message(raw)
    assert fragment in str(e.value).lower()


@pytest.mark.parametrize("t", [float("nan"), float("inf"), -1, 1e300, True, "now"])
def test_implausible_timestamps_are_dropped(t):
    msg = parse_message(_msg(submitted_at=t, items=[{"pos": 0, "path": "/x", "t": t}]))
    assert msg.submitted_at is None and msg.items[0].submitted_at is None


def test_salvage_names_job_and_positions_of_a_rejected_message():
    raw = _msg(v=99, items=[{"pos": 3, "path": "/a"}, {"pos": 3}, {"pos": -1}, "x", {"pos": 5}])
    job_id, items = salvage(raw)
    assert job_id == "a" * 32
    assert [(it.pos, it.ref) for it in items] == [(3, "/a"), (5, "pos:5")]
    assert salvage({"v": 1}) is None and salvage([1]) is None
    assert salvage(_msg(items=[{"path": "/no-pos"}])) is None


def test_refs_are_storable_text():
    name = os.fsdecode(b"/photos/caf\xe9.jpg")
    msg = parse_message(
        _msg(items=[{"pos": 0, "path": name}, {"pos": 1, "data": "", "key": "a\0b"}])
    )
    assert msg.items[0].path == name  # opened by its real name
    assert msg.items[0].ref == "/photos/caf\\xe9.jpg"
    assert msg.items[1].ref == "a\\x00b"
    assert display_ref("\ud800") == "\\ud800"
    for it in msg.items:
        it.ref.encode("utf-8")  # no surrogates left


# ------------------------------------------------------------------ reading


def _item(path) -> Item:
    return Item(pos=0, ref=str(path), path=os.fsdecode(path) if isinstance(path, bytes) else path)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_item(_item(str(tmp_path / "nope.jpg")), roots=[], max_bytes=1000)


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_item(_item(str(tmp_path)), roots=[], max_bytes=1000)


def test_relative_path_and_nul():
    with pytest.raises(InputError, match="not absolute"):
        read_item(_item("photos/a.jpg"), roots=[], max_bytes=1000)
    with pytest.raises(InputError, match="NUL"):
        read_item(_item("/tmp/a\0.jpg"), roots=[], max_bytes=1000)


def test_outside_allowed_roots(tmp_path):
    (tmp_path / "allowed").mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes(1))
    roots = [(tmp_path / "allowed").resolve()]
    with pytest.raises(InputError, match="outside the allowed roots.*SORTLINE_ALLOWED_ROOTS"):
        read_item(_item(str(secret)), roots=roots, max_bytes=10**6)
    with pytest.raises(InputError, match="outside the allowed roots"):
        read_item(
            _item(str(tmp_path / "allowed" / ".." / "secret.jpg")), roots=roots, max_bytes=10**6
        )
    with pytest.raises(InputError, match="outside the allowed roots"):
        read_item(_item("/etc/passwd"), roots=roots, max_bytes=10**6)


def test_symlink_escaping_the_roots(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes(1))
    (allowed / "link.jpg").symlink_to(secret)
    (allowed / "dirlink").symlink_to(tmp_path)
    inside = allowed / "real.jpg"
    inside.write_bytes(jpeg_bytes(2))
    (allowed / "ok-link.jpg").symlink_to(inside)
    roots = [allowed.resolve()]
    with pytest.raises(InputError, match="a link resolving to"):
        read_item(_item(str(allowed / "link.jpg")), roots=roots, max_bytes=10**6)
    with pytest.raises(InputError, match="outside the allowed roots"):
        read_item(_item(str(allowed / "dirlink" / "secret.jpg")), roots=roots, max_bytes=10**6)
    # a link that stays inside is fine
    assert read_item(_item(str(allowed / "ok-link.jpg")), roots=roots, max_bytes=10**6)


def test_symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(InputError):
        read_item(_item(str(tmp_path / "a")), roots=[], max_bytes=1000)


def test_non_utf8_file_name(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(jpeg_bytes(3))
    data = read_item(_item(raw), roots=[tmp_path.resolve()], max_bytes=10**6)
    assert data == jpeg_bytes(3)


def test_too_large_refused_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes(1) + b"\0" * 5000)
    reads = []
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: reads.append(a) or real_fdopen(*a, **k))
    with pytest.raises(InputError, match="too large.*SORTLINE_MAX_IMAGE_BYTES"):
        read_item(_item(str(big)), roots=[], max_bytes=1000)
    assert reads == []  # refused on its size, not a byte read
    assert read_item(_item(str(big)), roots=[], max_bytes=10**6)
    assert len(reads) == 1
    b64 = base64.b64encode(b"\xff" * 5000).decode()
    with pytest.raises(InputError, match="too large"):
        read_item(Item(pos=0, ref="k", data_b64=b64), roots=[], max_bytes=1000)


def test_bad_base64():
    with pytest.raises(InputError, match="base64"):
        read_item(Item(pos=0, ref="k", data_b64="not base64!"), roots=[], max_bytes=1000)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    p = tmp_path / "locked.jpg"
    p.write_bytes(jpeg_bytes(1))
    p.chmod(0)
    with pytest.raises(InputError, match="cannot read"):
        read_item(_item(str(p)), roots=[], max_bytes=10**6)


def test_fifo_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        read_item(_item(str(fifo)), roots=[], max_bytes=1000)


def test_link_swapped_in_after_the_check(tmp_path, monkeypatch):
    """The file opened is the file checked: a link that appears after resolve() is refused."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes(1))
    (allowed / "photo.jpg").symlink_to(outside / "secret.jpg")  # the last component
    (allowed / "sub").symlink_to(outside)  # a folder on the way
    roots = [allowed.resolve()]
    # as if each link had been put in place between resolve() and open()
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: self)
    with pytest.raises(InputError, match="cannot read"):
        read_item(_item(str(allowed / "photo.jpg")), roots=roots, max_bytes=10**6)
    with pytest.raises(InputError, match=r"outside the allowed roots \(opened as"):
        read_item(_item(str(allowed / "sub" / "secret.jpg")), roots=roots, max_bytes=10**6)


@pytest.mark.parametrize("fmt", ["EPS", "PDF", "ICO", "PCX", "TGA", "PPM"])
def test_only_photo_formats_are_opened(fmt):
    """PIL's other plugins (EPS would run Ghostscript) are never tried on untrusted bytes."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, fmt)
    with pytest.raises(ImageError, match=r"not a supported image format \(JPEG, PNG"):
        decode_image(buf.getvalue())


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"<?xml version='1.0'?><svg/>", "HTML/XML"),
        (b'{"not": "an image"}', "JSON"),
        (b"%PDF-1.7\n", "PDF"),
        (b"hello\tworld\n", "text"),
        (b"\x00\x01\x02garbage", "unknown binary data"),
    ],
)
def test_non_images_are_named(data, kind):
    with pytest.raises(ImageError, match=f"content is {kind},"):
        decode_image(data)
