"""Model registry, grayscale stems, default preprocessing and fine-tuning depth.

Every architecture takes one real optimizer step (random init, 2 x 3 x 64 x 64): the loss is
finite, every trainable tensor gets a gradient, the head and every stage move, and frozen tensors
and frozen BatchNorm statistics do not.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from covidcxr.data.io import read_xray
from covidcxr.data.preprocess import preprocess
from covidcxr.errors import ConfigError
from covidcxr.models.finetune import apply_finetune, param_groups, trainable_parameter_names
from covidcxr.models.registry import (
    convert_stem_to_grayscale,
    create_model,
    resolve_spec,
    get_architecture,
    list_models,
)

TORCHVISION = ["resnet18", "resnet50", "resnet101", "densenet121", "densenet161", "squeezenet1_0",
               "squeezenet1_1", "mobilenet_v2", "vgg16", "vgg19", "efficientnet_b0"]
TIMM = ["tf_efficientnet_lite0", "convnext_tiny"]
ALL = TORCHVISION + TIMM


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_step(model: nn.Module, arch: str, lr: float = 0.05) -> float:
    opt = torch.optim.SGD(param_groups(model, arch, lr=lr, weight_decay=0.0), lr=lr)
    model.train()
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_every_seed_architecture_is_registered():
    for name in TORCHVISION:
        assert name in list_models()
        assert get_architecture(name).source == "torchvision"
    for name in TIMM + ["timm:efficientnet_b0"]:
        assert get_architecture(name).source == "timm"
    assert get_architecture("timm:efficientnet_b0").name == "timm:efficientnet_b0"  # round-trips through run.json


def test_unknown_model_and_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="neither a covidcxr architecture"):
        get_architecture("resnet_does_not_exist")
    with pytest.raises(ConfigError, match="channels"):
        create_model("resnet18", 2, channels=2)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet18", 0)


def test_densenet_cam_layer_is_norm5():
    model = create_model("densenet121", 2)
    assert get_architecture("densenet121").cam_layer(model) is model.features.norm5


def test_preprocessing_normalisation_travels_with_the_architecture():
    from covidcxr.data.preprocess import PreprocessSpec

    lite = resolve_spec(None, "tf_efficientnet_lite0")
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5) and lite.image_size == 224
    resnet = resolve_spec(PreprocessSpec(image_size=128, intensity="clahe"), "resnet18", channels=1)
    assert resnet.channels == 1 and resnet.image_size == 128 and resnet.intensity == "clahe"
    assert resnet.mean == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))
    assert resolve_spec(None, "tf_efficientnet_lite2").image_size == 260  # the weights' resolution


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_grayscale_stem_equals_rgb_model_on_repeated_real_image(name, data_root):
    """channels=1 (summed stem) on a real grey X-ray == channels=3 on the repeated image, same weights."""
    row = pd.read_csv(data_root / "manifest.csv").iloc[0]
    pixels = read_xray(data_root / row["image"]).pixels
    # Equal statistics per channel (0.5 / 0.5 for the Lite family) make the two inputs identical.
    spec3 = resolve_spec({"image_size": 96}, "tf_efficientnet_lite0")
    spec1 = resolve_spec({"image_size": 96}, "tf_efficientnet_lite0", channels=1)
    x3, x1 = preprocess(pixels, spec3).unsqueeze(0), preprocess(pixels, spec1).unsqueeze(0)
    assert x3.shape[1] == 3 and x1.shape[1] == 1 and torch.equal(x3, x1.repeat(1, 3, 1, 1))
    torch.manual_seed(0)
    rgb = create_model(name, 3).eval()
    grey = create_model(name, 3, channels=1).eval()
    grey.load_state_dict({k: (v.sum(1, keepdim=True) if v.ndim == 4 and v.shape[1] == 3 else v)
                          for k, v in rgb.state_dict().items()})
    stem = next(m for m in grey.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 1 and type(stem) is type(next(m for m in rgb.modules() if isinstance(m, nn.Conv2d)))
    with torch.no_grad():
        a, b = rgb(x3), grey(x1)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert not torch.allclose(a, torch.zeros_like(a))


def test_convert_stem_to_grayscale_refuses_model_without_rgb_stem():
    with pytest.raises(ConfigError, match="3-channel"):
        convert_stem_to_grayscale(nn.Sequential(nn.Conv2d(1, 4, 3)))


def _check_head_stages_and_cam_layer(model: nn.Module, name: str) -> dict:
    """Structure checks; returns a dict that receives the CAM layer's output shape on the next forward."""
    arch = get_architecture(name)
    head = arch.head_parameter_names(model)
    # The head is the layer producing the 3 logits: exactly one weight + one bias tensor.
    assert len(head) == 2 and {n.rsplit(".", 1)[1] for n in head} == {"weight", "bias"}
    assert dict(model.named_parameters())[next(n for n in head if n.endswith(".weight"))].shape[0] == 3
    # Stages are disjoint, in network order, and hold no head parameter.
    stages = arch.stage_parameter_names(model)
    flat = [n for s in stages for n in s]
    order = [n for n, _ in model.named_parameters()]
    assert len(stages) >= 4 and len(flat) == len(set(flat)) and not set(flat) & set(head)
    assert [order.index(s[0]) for s in stages] == sorted(order.index(s[0]) for s in stages)
    # The CAM layer is a real sub-module; its output must be a spatial feature map.
    cam = arch.cam_layer(model)
    assert any(m is cam for m in model.modules())
    seen: dict = {}
    cam.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    return seen


@pytest.mark.parametrize("name", ALL)
def test_one_real_training_step_full(name):
    torch.manual_seed(0)
    model = create_model(name, 3)
    cam_output = _check_head_stages_and_cam_layer(model, name)
    plan = apply_finetune(model, name, "full")
    assert plan.frozen == () and plan.frozen_norm_layers == ()
    before = _snapshot(model)
    loss = _train_step(model, name)
    assert torch.isfinite(torch.tensor(loss))
    assert len(cam_output["shape"]) == 4 and cam_output["shape"][-1] >= 2  # a feature map at 64 px, not pooled
    arch = get_architecture(name)
    params = dict(model.named_parameters())
    # Every parameter is connected to the loss (no dead branch, nothing accidentally frozen).
    assert [n for n, p in params.items() if p.grad is None or not p.grad.any()] == []
    for n in arch.head_parameter_names(model):
        assert not torch.equal(params[n], before[n]), n
    for stage in arch.stage_parameter_names(model):
        assert any(not torch.equal(params[n], before[n]) for n in stage), stage[0]


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "tf_efficientnet_lite0", "convnext_tiny"])
def test_linear_probe_trains_only_the_head_and_keeps_frozen_batchnorm_in_eval(name):
    torch.manual_seed(0)
    model = create_model(name, 3)
    plan = apply_finetune(model, name, "linear")
    head = set(get_architecture(name).head_parameter_names(model))
    assert set(plan.trainable) == head
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert set(plan.frozen_norm_layers) == set(bns)
    before = _snapshot(model)
    loss = _train_step(model, name)
    assert torch.isfinite(torch.tensor(loss))
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == head  # neither frozen weights nor BatchNorm running statistics moved
    groups = param_groups(model, name, lr=0.1)
    assert {g["name"] for g in groups} <= {"head", "head_no_decay"}


@pytest.mark.parametrize("name,k", [("resnet18", 2), ("efficientnet_b0", 1), ("tf_efficientnet_lite0", 1)])
def test_last_k_stages_train_with_head_earlier_stages_frozen(name, k):
    torch.manual_seed(0)
    model = create_model(name, 3)
    arch = get_architecture(name)
    stages = arch.stage_parameter_names(model)
    plan = apply_finetune(model, name, "last_k", last_k=k)
    expected = {n for s in stages[-k:] for n in s} | set(arch.head_parameter_names(model))
    assert set(plan.trainable) == expected
    before = _snapshot(model)
    _train_step(model, name)
    after = model.state_dict()
    frozen_stage_keys = [key for key in after for s in stages[:-k] for n in s
                         if key.rsplit(".", 1)[0] == n.rsplit(".", 1)[0]]
    assert frozen_stage_keys and all(torch.equal(after[key], before[key]) for key in frozen_stage_keys)
    assert all(not torch.equal(after[n], before[n]) for n in arch.head_parameter_names(model))
    assert any(not torch.equal(after[n], before[n]) for n in stages[-1])
    # Frozen BatchNorm keeps its running statistics; trainable BatchNorm updates them.
    bn_frozen = set(plan.frozen_norm_layers)
    trainable_bn = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and n not in bn_frozen]
    assert trainable_bn and any(not torch.equal(after[f"{n}.running_mean"], before[f"{n}.running_mean"]) for n in trainable_bn)
    # Back to full fine-tuning removes the eval hooks: every BatchNorm follows model.train() again.
    apply_finetune(model, name, "full")
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))


def test_finetune_validates_mode_and_depth():
    model = create_model("resnet18", 2)
    with pytest.raises(ConfigError, match="finetune.mode"):
        apply_finetune(model, "resnet18", "half")
    with pytest.raises(ConfigError, match=r"resnet18 has 5 stages"):
        trainable_parameter_names(model, "resnet18", "last_k", last_k=6)
    with pytest.raises(ConfigError, match="backbone_lr_mult"):
        param_groups(model, "resnet18", lr=0.1, backbone_lr_mult=0)


def test_param_groups_split_lr_and_weight_decay():
    model = create_model("convnext_tiny", 2)
    apply_finetune(model, "convnext_tiny", "full")
    groups = {g["name"]: g for g in param_groups(model, "convnext_tiny", lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    assert all(p.ndim > 1 for p in groups["backbone"]["params"])
    assert all(p.ndim <= 1 for p in groups["backbone_no_decay"]["params"])  # biases, norm weights, layer scale
    n_groups = sum(len(g["params"]) for g in groups.values())
    assert n_groups == sum(1 for p in model.parameters() if p.requires_grad)
