"""Expanding paths, folders and globs into a job's files."""

from __future__ import annotations

import threading

import pytest

from producer.stream import watch_folder
from producer.submit import MissingPaths, NothingToDo, expand_paths, submit_paths
from tests.support.fixtures import jpeg_bytes, write_images
from tests.support.services import wait_until


def test_expand_folders_globs_and_files(tmp_path):
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "a" / "sub", 3)
    (tmp_path / "a" / "notes.txt").write_text("x")
    flat = expand_paths([tmp_path / "a"])
    assert [p.rsplit("/", 1)[1] for p in flat] == ["img00000.jpg", "img00001.jpg"]
    assert len(expand_paths([tmp_path / "a"], recursive=True)) == 5
    assert len(expand_paths([str(tmp_path / "a" / "*.jpg")])) == 2
    assert len(expand_paths([tmp_path / "a"], pattern="*.txt")) == 1
    # a missing file is refused here, or kept for the workers to look for (and record)
    with pytest.raises(MissingPaths, match="1 path\\(s\\) do not exist: .*gone.jpg; check them"):
        expand_paths([tmp_path / "gone.jpg"])
    gone = str(tmp_path / "gone.jpg")
    assert expand_paths([tmp_path / "gone.jpg"], worker_paths=True) == [gone]
    with pytest.raises(NothingToDo, match="no file matches"):
        expand_paths([str(tmp_path / "*.png")])


def test_watch_folder_yields_new_complete_files(tmp_path):
    (tmp_path / "old.jpg").write_bytes(jpeg_bytes(0))
    stop = threading.Event()
    got: list[str] = []

    files = watch_folder(tmp_path, poll=0.05, stop=stop)  # old.jpg is already there
    t = threading.Thread(target=lambda: got.extend(files))
    t.start()
    try:
        (tmp_path / "new.jpg").write_bytes(jpeg_bytes(1))
        (tmp_path / "notes.txt").write_text("x")
        wait_until(lambda: got, timeout=5)
    finally:
        stop.set()
        t.join()
    assert got == [str(tmp_path / "new.jpg")]


def test_a_folder_of_class_folders_without_r_suggests_it(tmp_path):
    write_images(tmp_path / "data" / "glass", 1)
    write_images(tmp_path / "data" / "paper", 1)
    with pytest.raises(NothingToDo, match="has 2 sub-folders \\(glass, paper\\); add -r"):
        submit_paths([tmp_path / "data"])
