"""Inference runtimes: ONNX Runtime and PyTorch agree; the micro-batcher; device fallback."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from tests.support.fixtures import jpeg_bytes
from training.model.preprocess import load_and_preprocess
from worker.runtime import Classifier, MicroBatcher


@pytest.fixture(scope="module")
def batch(tiny_model):
    from training.model.checkpoint import preprocess_spec, read_metadata

    spec = preprocess_spec(read_metadata(tiny_model))
    return np.stack([load_and_preprocess(jpeg_bytes(i), spec) for i in range(24)])


def test_onnx_and_torch_agree(tiny_model, batch):
    onnx = Classifier(tiny_model, runtime="onnx", device="cpu")
    torch_ = Classifier(tiny_model, runtime="torch", device="cpu")
    assert onnx.backend.name == "onnx" and torch_.backend.name == "torch"
    p1, p2 = onnx.predict(batch)[:, :6], torch_.predict(batch)[:, :6]
    assert (p1.argmax(1) == p2.argmax(1)).all()
    assert np.abs(p1 - p2).max() < 1e-3


def test_requested_gpu_falls_back_to_cpu_with_a_warning(tiny_model, batch, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with caplog.at_level(logging.WARNING, logger="worker.runtime"):
        clf = Classifier(tiny_model, device="cuda")
    assert "falling back to the CPU" in caplog.text
    assert clf.predict(batch[:2]).shape == (2, 7)  # six probabilities, then unfamiliarity


@pytest.mark.gpu
def test_cuda_fp16_agrees_with_onnx(tiny_model, batch):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = Classifier(tiny_model, device="cuda")
    assert gpu.backend.name == "torch" and gpu.backend.device.type == "cuda"
    ref = Classifier(tiny_model, runtime="onnx", device="cpu").predict(batch)[:, :6]
    got = gpu.predict(batch)[:, :6]
    assert (ref.argmax(1) == got.argmax(1)).mean() > 0.95 and np.abs(ref - got).max() < 2e-2


def test_micro_batcher_gathers_concurrent_callers():
    calls: list[int] = []
    gate = threading.Barrier(6)

    def predict(x):
        calls.append(len(x))
        return x.sum(axis=1, keepdims=True)

    mb = MicroBatcher(predict, max_batch=8, max_wait=2.0)
    out: dict[int, np.ndarray] = {}

    def call(i):
        with mb:
            gate.wait()
            out[i] = mb.predict(np.full((1, 3), float(i)))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(calls) == 6 and max(calls) > 1  # gathered, not one forward pass each
    assert all(out[i][0, 0] == 3 * i for i in range(6))  # each caller got its own rows


def test_micro_batcher_lone_caller_does_not_wait_and_large_calls_are_chunked():
    import time

    sizes: list[int] = []
    mb = MicroBatcher(lambda x: sizes.append(len(x)) or x, max_batch=4, max_wait=5.0)
    t0 = time.monotonic()
    with mb:
        got = mb.predict(np.arange(10, dtype=np.float32).reshape(10, 1))
    assert time.monotonic() - t0 < 1.0
    assert sizes == [4, 4, 2] and got[:, 0].tolist() == list(range(10))
