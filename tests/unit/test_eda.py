"""`sortline eda`: measured figures on a generated dataset, and the known defects of TrashNet."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from sortline.cli import cli
from training.reports.eda import run_eda

TRASHNET = Path(__file__).resolve().parents[3] / "shared" / "trashnet"


def _photo(seed: int, box=(60, 80, 140, 200), size=(192, 256), quality=95) -> bytes:
    """A coloured object with a seeded pattern on a white background."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle(box, fill=(rng.randrange(200), rng.randrange(200), rng.randrange(200)))
    x0, y0, x1, y1 = box
    for _ in range(6):  # a pattern inside the object, so that hashes differ
        cx, cy = rng.randrange(x0, x1 - 10), rng.randrange(y0, y1 - 10)
        w, h = rng.randrange(8, (x1 - x0) // 2), rng.randrange(8, (y1 - y0) // 2)
        fill = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((cx, cy, min(x1, cx + w), min(y1, cy + h)), fill=fill)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    for k, (c, n) in enumerate((("glass", 4), ("metal", 3), ("paper", 2))):
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{c}{i}.jpg").write_bytes(
                _photo(100 * k + i, box=(40 + 10 * i, 60, 150, 220))
            )
    # the same bytes under two classes
    dup = _photo(1000, box=(20, 20, 100, 100))
    (root / "glass" / "same.jpg").write_bytes(dup)
    (root / "metal" / "same.jpg").write_bytes(dup)
    # the same photo re-encoded: other bytes, same perceptual hash
    (root / "paper" / "twin_a.jpg").write_bytes(_photo(2000, quality=95))
    (root / "paper" / "twin_b.jpg").write_bytes(_photo(2000, quality=70))
    # a truncated JPEG, a file that is no image, and a non-image name
    (root / "metal" / "broken.jpg").write_bytes(_photo(3000)[:300])
    (root / "glass" / "notes.jpg").write_bytes(b"hello, I am text")
    (root / "glass" / "README.txt").write_text("not an image")
    return root


def test_eda_measures_counts_sizes_box_and_defects(dataset, tmp_path):
    out = tmp_path / "eda"
    s = run_eda(dataset, out)

    assert s["class_counts"] == {"glass": 5, "metal": 4, "paper": 4}
    assert s["imbalance_ratio"] == 1.25
    assert s["sizes"] == {"192x256": 13}
    assert s["aspect"]["all"]["median"] == 0.75
    unreadable = {d["file"]: d["reason"] for d in s["integrity"]["unreadable"]}
    assert set(unreadable) == {"metal/broken.jpg", "glass/notes.jpg"}
    assert "truncated" in unreadable["metal/broken.jpg"]
    assert "not an image" in unreadable["glass/notes.jpg"]
    assert s["integrity"]["ignored_files"] == ["glass/README.txt"]

    ex = s["exact_duplicates"]
    assert ex["cross_class"] == 1
    assert ex["items"][0]["files"] == ["glass/same.jpg", "metal/same.jpg"]
    groups = [sorted(d["files"]) for d in s["near_duplicates"]["items"]]
    assert ["paper/twin_a.jpg", "paper/twin_b.jpg"] in groups
    assert ["glass/same.jpg", "metal/same.jpg"] in groups

    # the box of the drawn object (x 40..150, y 60..220 of 192x256), within a few pixels
    rows = {r["file"]: r for r in _csv(out / "images.csv")}
    x0, y0, x1, y1 = map(int, rows["glass/glass0.jpg"]["bbox"].split())
    assert abs(x0 - 40) <= 8 and abs(y0 - 60) <= 8 and abs(x1 - 151) <= 8 and abs(y1 - 221) <= 8
    assert 0.3 < float(rows["glass/glass0.jpg"]["bbox_coverage"]) < 0.45
    assert s["brightness"]["all"]["mean"] > 150

    assert json.loads((out / "eda.json").read_text())["class_counts"] == s["class_counts"]
    html = (out / "eda.html").read_text()
    for name in s["charts"].values():
        assert (out / name).stat().st_size > 1000
    assert html.count("data:image/png;base64,") == len(s["charts"])
    assert 'src="http' not in html and "<script" not in html


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eda_command(dataset, tmp_path):
    out = tmp_path / "eda"
    r = CliRunner().invoke(cli, ["eda", str(dataset), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "exact duplicates: 1 sets, 1 across classes" in r.output
    assert (out / "eda.html").exists()
    r = CliRunner().invoke(cli, ["eda", str(tmp_path / "eda"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no class folders" in r.output


@pytest.mark.skipif(not TRASHNET.is_dir(), reason=f"TrashNet copy not at {TRASHNET}")
def test_eda_of_trashnet_reports_its_known_defects(tmp_path):
    """The figures of ../shared/trashnet/DATA.md: class counts, 3 cross-class copies, ~28 groups."""
    t0 = time.perf_counter()
    s = run_eda(TRASHNET, tmp_path / "eda")
    seconds = time.perf_counter() - t0
    assert s["class_counts"] == {
        "cardboard": 343,
        "glass": 426,
        "metal": 348,
        "paper": 505,
        "plastic": 410,
        "trash": 116,
    }
    assert s["n_images"] == 2148 and s["integrity"]["unreadable"] == []
    assert s["sizes"] == {"384x512": 2148}
    cross = sorted(d["files"] for d in s["exact_duplicates"]["items"] if d["cross_class"])
    assert cross == [
        ["glass/glass115.jpg", "metal/metal91.jpg"],
        ["glass/glass176.jpg", "plastic/plastic152.jpg"],
        ["glass/glass389.jpg", "plastic/plastic332.jpg"],
    ]
    nd = s["near_duplicates"]
    assert nd["groups"] == 28  # DATA.md: "about 28 groups", the same pHash <= 4 grouping
    groups = [set(d["files"]) for d in nd["items"]]
    assert {"cardboard/cardboard15.jpg", "cardboard/cardboard361.jpg"} in groups
    assert seconds < 120, f"EDA of TrashNet took {seconds:.0f} s"
