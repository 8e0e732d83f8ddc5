"""One factory for every architecture: ``create_model(name, num_classes, ...)``.

The seed papers' torchvision CNNs are registered by name; any other name is looked up in timm.
Each architecture carries what the rest of covidcxr needs to know about it (its classifier head,
its stages for partial fine-tuning, its Grad-CAM layer, its ImageNet normalisation), so nothing
downstream needs an if-chain over model names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from covidcxr.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Architecture:
    """What covidcxr knows about one architecture family."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> model with random weights
    head: Callable[[nn.Module], list[str]]  # parameter-name prefixes of the new classifier head
    stages: Callable[[nn.Module], list[nn.Module]]  # backbone stages, input -> output order
    cam_layer: Callable[[nn.Module], nn.Module]  # default Grad-CAM target layer
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "torchvision"


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    _REGISTRY[arch.name] = arch
    return arch


def list_models() -> list[str]:
    """Names registered here; any timm model name is accepted as well."""
    return sorted(_REGISTRY)


def _tv(name: str, **kwargs) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return build


def _resnet(name: str) -> Architecture:
    return Architecture(
        name=name,
        build=_tv(name),
        head=lambda m: ["fc."],
        stages=lambda m: [nn.Sequential(m.conv1, m.bn1), m.layer1, m.layer2, m.layer3, m.layer4],
        cam_layer=lambda m: m.layer4[-1],
    )


def _densenet(name: str) -> Architecture:
    def stages(m):
        f = m.features
        return [nn.Sequential(f.conv0, f.norm0), f.denseblock1, nn.Sequential(f.transition1, f.denseblock2),
                nn.Sequential(f.transition2, f.denseblock3), nn.Sequential(f.transition3, f.denseblock4, f.norm5)]

    return Architecture(name=name, build=_tv(name), head=lambda m: ["classifier."], stages=stages,
                        cam_layer=lambda m: m.features.denseblock4)


def _features_arch(name: str, head_prefix: str, cam_index: int = -1, **kwargs) -> Architecture:
    # Families whose backbone is one ``features`` Sequential (VGG, MobileNetV2, EfficientNet, SqueezeNet).
    return Architecture(
        name=name,
        build=_tv(name, **kwargs),
        head=lambda m: [head_prefix],
        stages=lambda m: list(m.features),
        cam_layer=lambda m: m.features[cam_index],
    )


for _n in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register(_resnet(_n))
for _n in ("densenet121", "densenet161"):
    register(_densenet(_n))
for _n in ("vgg16", "vgg19"):
    # features[-1] is the last max-pool; Grad-CAM wants the last ReLU before it.
    register(_features_arch(_n, "classifier.6.", cam_index=-2))
register(_features_arch("squeezenet1_0", "classifier.1."))
register(_features_arch("squeezenet1_1", "classifier.1."))
register(_features_arch("mobilenet_v2", "classifier.1."))
register(_features_arch("efficientnet_b0", "classifier.1."))


def _timm_arch(name: str) -> Architecture:
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f"model {name!r} is neither a covidcxr architecture ({', '.join(list_models())}) nor a timm model; "
            "see timm.list_models() for timm names"
        )
    cfg = timm.models.get_pretrained_cfg(name)
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD

    def head(m):
        return [m.default_cfg.get("classifier", "classifier") + "."] if hasattr(m, "default_cfg") else ["classifier."]

    def stages(m):
        names = [info["module"] for info in m.feature_info]
        return [m.get_submodule(n) for n in names]

    def cam_layer(m):
        return m.get_submodule(m.feature_info[-1]["module"])

    return Architecture(
        name=name,
        build=lambda num_classes: timm.create_model(name, pretrained=False, num_classes=num_classes),
        head=head, stages=stages, cam_layer=cam_layer, mean=mean, std=std, source="timm",
    )


def get_architecture(name: str) -> Architecture:
    """The registered architecture, or a timm model wrapped on the fly."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    return _timm_arch(name.removeprefix("timm:"))


def convert_stem_to_grayscale(model: nn.Module) -> nn.Module:
    """Replace the first 3-channel conv by a 1-channel conv whose kernel is the sum over RGB.

    Summing keeps the pretrained response to a grey image (R = G = B) unchanged, so ImageNet
    weights stay useful for a single-channel X-ray.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(1, child.out_channels, child.kernel_size, child.stride, child.padding,
                                child.dilation, child.groups, child.bias is not None, child.padding_mode)
                with torch.no_grad():
                    new.weight.copy_(child.weight.sum(dim=1, keepdim=True))
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return model
    raise ConfigError("could not find a 3-channel input convolution to convert to 1 channel")


def create_model(name: str, num_classes: int, *, channels: int = 3, weights: str | None = None,
                 weights_sha256: str | None = None) -> nn.Module:
    """Build ``name`` with a new ``num_classes`` head.

    ``weights``: ``None``/``"none"`` (random init), ``"imagenet"`` (torchvision / timm hub cache,
    or covidcxr's offline sources), or a path to a ``.safetensors`` / state-dict file (checked
    against ``weights_sha256`` when given). ``channels=1`` converts the stem by summing the
    pretrained first-conv kernels over RGB.
    """
    arch = get_architecture(name)
    model = arch.build(num_classes)
    if weights not in (None, "none"):
        from covidcxr.models.weights import load_pretrained

        load_pretrained(model, arch, weights, expected_sha256=weights_sha256)
    if channels == 1:
        convert_stem_to_grayscale(model)
    elif channels != 3:
        raise ConfigError(f"channels={channels}: must be 1 or 3")
    return model
