"""Hypothesis strategies for hostile input: mutated images, arbitrary JSON, task messages."""

from __future__ import annotations

import base64
from pathlib import Path

from hypothesis import strategies as st

from tests.support import hostile
from tests.support.fixtures import jpeg_bytes
from worker.inputs import MAX_POSITION

SEEDS = [
    jpeg_bytes(1, (40, 30)),
    jpeg_bytes(2, (33, 21), fmt="PNG"),
    jpeg_bytes(3, (24, 24), fmt="GIF"),
    jpeg_bytes(4, (24, 24), fmt="WEBP"),
    jpeg_bytes(5, (24, 24), fmt="BMP"),
    jpeg_bytes(6, (24, 24), fmt="TIFF"),
    hostile.png_16bit(),
    hostile.jpeg_cmyk(),
    hostile.jpeg_exif_rotated(),
    hostile.gif_animated(),
]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image in some format, then truncated, bit-flipped, spliced or extended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "dup"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(max_size=16))
        elif op == "dup" and data:
            data[i:i] = data[i : i + draw(st.integers(1, 64))]
    return bytes(data)


image_bytes = st.one_of(st.binary(max_size=2048), mutated_images())
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["/tmp/x.jpg", "\x00", "\udce9", "../../etc/passwd", "", "aGVsbG8="]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def messages(draw, job_ids=st.text(max_size=40)):
    """Arbitrary JSON, or something shaped like a task message with arbitrary parts."""
    if draw(st.booleans()):
        return draw(json_values)
    keys = {
        "v": st.one_of(st.just(1), json_scalars),
        "job_id": job_ids,
        "submitted_at": json_scalars,
        "items": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "pos": st.one_of(st.integers(-3, 40), st.just(MAX_POSITION + 1), json_scalars),
                    "path": st.one_of(json_scalars, st.sampled_from(["/nope.jpg", "rel.jpg"])),
                    "data": st.one_of(
                        json_scalars,
                        image_bytes.map(lambda b: base64.b64encode(b).decode()),
                    ),
                    "key": json_scalars,
                    "t": json_scalars,
                },
            )
            | json_values,
            max_size=6,
        )
        | json_scalars,
    }
    msg = {}
    for k, strategy in keys.items():
        if draw(st.integers(0, 9)) > 0:  # each key is sometimes missing
            msg[k] = draw(strategy)
    return msg


def task_messages(job_id: str, photos: Path, n_photos: int = 3) -> st.SearchStrategy:
    """Mostly near-valid messages for *job_id* (photos 0..n-1.jpg exist in *photos*), and
    some arbitrary JSON."""
    photo_paths = [str(photos / f"{i}.jpg") for i in range(n_photos + 1)]  # the last: missing
    paths = st.one_of(
        st.sampled_from(photo_paths),
        st.sampled_from(["/nope.jpg", "rel.jpg", "\x00", str(photos / "..")]),
        st.text(max_size=9),
    )
    b64 = image_bytes.map(lambda b: base64.b64encode(b).decode())
    extra = {"key": st.text(max_size=9), "t": json_scalars}
    item = st.one_of(
        st.fixed_dictionaries({"pos": st.integers(0, 40), "path": paths}, optional=extra),
        st.fixed_dictionaries({"pos": st.integers(0, 40), "data": b64}, optional=extra),
        st.fixed_dictionaries(
            {"pos": st.integers(0, 40)}, optional={"path": paths, "data": b64, **extra}
        ),
    )
    near_valid = st.fixed_dictionaries(
        {
            "v": st.sampled_from([1, 1, 1, 2]),
            "job_id": st.sampled_from([job_id, job_id, job_id, "0" * 32]),
            "items": st.lists(item, min_size=1, max_size=5),
        },
        optional={"submitted_at": json_scalars},
    )
    anything = messages(job_ids=st.sampled_from([job_id, "0" * 32, "x"]))
    return st.one_of(near_valid, near_valid, anything)
