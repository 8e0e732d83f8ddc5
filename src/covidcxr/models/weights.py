"""Loading pretrained weights safely: safetensors or ``torch.load(weights_only=True)``, SHA-256 checked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from covidcxr.errors import WeightsError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a pickled state dict without executing code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if expected_sha256:
        actual = sha256_file(path)
        if actual.lower() != expected_sha256.lower():
            raise WeightsError(f"{path}: SHA-256 is {actual}, expected {expected_sha256}; the file is corrupt or not the one you meant")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles
        raise WeightsError(f"{path}: cannot be read as a weights file ({exc.__class__.__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], head_prefixes: list[str],
                        origin: str) -> None:
    """Load ``state`` into every non-head parameter of ``model``; the head stays freshly initialised.

    Files holding only a sub-module (e.g. torchvision ``mobilenet_v2().features``) are matched by
    trying the sub-module name as a key prefix. Every backbone tensor must be covered with the
    right shape, otherwise the error lists what is missing.
    """
    target = model.state_dict()
    is_head = lambda k: any(k.startswith(p) for p in head_prefixes)  # noqa: E731
    backbone_keys = [k for k in target if not is_head(k)]
    best: dict[str, torch.Tensor] = {}
    for prefix in ["", "features.", "backbone.", "model."]:
        cand = {prefix + k: v for k, v in state.items()}
        cand = {k: v for k, v in cand.items() if k in target and not is_head(k) and v.shape == target[k].shape}
        if len(cand) > len(best):
            best = cand
    missing = [k for k in backbone_keys if k not in best and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"{origin}: does not fit this architecture; {len(missing)} backbone tensors missing or of another "
            f"shape (first: {missing[:3]}). Check that the file was saved from the same architecture."
        )
    model.load_state_dict(best, strict=False)


def load_pretrained(model: nn.Module, arch, weights: str, expected_sha256: str | None = None) -> None:
    """Fill ``model``'s backbone from ``weights`` ("imagenet" or a file path)."""
    head = arch.head(model)
    if weights == "imagenet":
        state, origin = imagenet_state_dict(arch), f"ImageNet weights for {arch.name}"
    else:
        state, origin = read_state_dict(weights, expected_sha256), str(weights)
    load_backbone_state(model, state, head, origin)


def imagenet_state_dict(arch) -> dict[str, torch.Tensor]:
    """ImageNet weights from the torchvision / timm hub cache (downloads where there is internet)."""
    try:
        if arch.source == "timm":
            import timm

            return timm.create_model(arch.name, pretrained=True).state_dict()
        import torchvision

        return torchvision.models.get_model(arch.name, weights="DEFAULT").state_dict()
    except Exception as exc:
        raise WeightsError(
            f"ImageNet weights for {arch.name} are not in the local hub cache and could not be downloaded "
            f"({exc.__class__.__name__}). On a machine with internet run "
            f"`python -c \"import torchvision; torchvision.models.get_model('{arch.name}', weights='DEFAULT')\"` "
            "(or timm.create_model(name, pretrained=True)) and copy ~/.cache/torch (or ~/.cache/huggingface) here, "
            "or pass weights=PATH to a local .safetensors / .pth file."
        ) from exc
