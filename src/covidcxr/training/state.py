"""Devices, determinism and checkpoints: everything a killed run needs to resume bit-identically.

Every epoch's randomness is derived from ``(seed, epoch)``; ``checkpoints/last.pt`` holds model,
optimiser, scheduler, RNG states, early-stopping state and history, written atomically and read
back with ``torch.load(weights_only=True)`` (plain types and tensors only).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import atomic_write_bytes
from covidcxr.training.sampling import epoch_rng

CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.pt"
BEST_WEIGHTS = "best.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key train.device: {name!r} asked for, but CUDA is not available; use auto or cpu")
    return dev


def seed_everything(seed: int, epoch: int = 0) -> None:
    """Seed python, numpy and torch from ``(seed, epoch)``: each epoch's randomness is independent."""
    s = int(epoch_rng(seed, epoch, stream=2).integers(2**31 - 1))
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def rng_state() -> dict:
    """RNG states as plain types / tensors (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CovidCXRError(f"{path}: no checkpoint to resume from; start without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CovidCXRError(f"{path}: checkpoint cannot be read ({exc.__class__.__name__}: {exc}); "
                            "start again without --resume") from exc
