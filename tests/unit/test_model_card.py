"""The model card's Hugging Face YAML front matter: readable, and the shipped file's figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import DEFAULT_CHECKPOINT
from training.model.checkpoint import read_metadata

CARD = Path(__file__).resolve().parents[2] / "models" / "MODEL_CARD.md"


def front_matter() -> dict:
    text = CARD.read_text()
    assert text.startswith("---\n"), "the card must open with YAML front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_front_matter_names_licence_dataset_and_metrics():
    meta = front_matter()
    assert meta["license"] == "mit" and meta["datasets"] == ["trashnet"]
    assert set(meta["metrics"]) == {"accuracy", "f1"}
    assert meta["pipeline_tag"] == "image-classification"
    version = read_metadata(DEFAULT_CHECKPOINT)["version"]
    assert meta["model-index"][0]["name"] == f"sortline-trashnet-{version}"


def test_model_index_figures_are_the_shipped_files():
    metrics = read_metadata(DEFAULT_CHECKPOINT)["metrics"]
    expected = {
        "test accuracy": metrics["test"]["accuracy"],
        "test macro-F1": metrics["test"]["macro_f1"],
        "val accuracy": metrics["val"]["accuracy"],
        "val macro-F1": metrics["val"]["macro_f1"],
        "robustness accuracy": metrics["test_robustness"]["mean_corrupted"]["accuracy"],
        "robustness macro-F1": metrics["test_robustness"]["mean_corrupted"]["macro_f1"],
    }
    found = {
        m["name"]: m["value"]
        for result in front_matter()["model-index"][0]["results"]
        for m in result["metrics"]
    }
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, abs=0.0005), name
