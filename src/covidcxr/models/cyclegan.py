"""CycleGAN networks and the CycleGAN run directory (``covidcxr synth``).

The networks are the published CycleGAN defaults (Zhu et al. 2017; the reference implementation
junyanz/pytorch-CycleGAN-and-pix2pix, ``--netG resnet_9blocks --netD basic --norm instance``):

* :class:`ResnetGenerator`: 7x7 conv, two stride-2 down-sampling convs, ``n_blocks`` residual blocks
  (9 at 256 px, 6 at 128 px), two transposed-conv up-samplings, 7x7 conv, ``tanh``; reflection padding,
  instance norm without affine parameters, no dropout.
* :class:`PatchDiscriminator`: the 70x70 PatchGAN (three stride-2 4x4 convs, one stride-1, one output
  conv; LeakyReLU 0.2; no norm on the first layer), one real/fake score per 70x70 patch.

Both take one grey channel in ``[-1, 1]``: the run's :class:`~covidcxr.data.preprocess.PreprocessSpec`
has ``channels=1, mean=0.5, std=0.5``, so :func:`covidcxr.data.preprocess.to_tensor` makes the input
and ``(y + 1) / 2`` turns an output back into a [0, 1] image.

A run directory holds ``generator_a2b.safetensors`` / ``generator_b2a.safetensors`` and ``run.json`` with
a :class:`SynthRecord` (format ``covidcxr-synth/1``), sealed and checked by the same integrity machinery
as classifier runs (:mod:`covidcxr.models.record`); :func:`load_generator` refuses an edited record or a
generator whose SHA-256 is not the recorded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from covidcxr.data.preprocess import PreprocessSpec, prepare, to_tensor, working_image
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.models.record import RUN_JSON, Integrity, read_sealed_record, write_run_record
from covidcxr.models.run import save_weights
from covidcxr.models.weights import sha256_file, verify_recorded_file

#: The run.json format of a CycleGAN run (same integrity block as classifier and segmenter records).
SYNTH_FORMAT = "covidcxr-synth/1"
DIRECTIONS = ("a2b", "b2a")
GENERATOR_FILES = {d: f"generator_{d}.safetensors" for d in DIRECTIONS}
#: Grey value 0.5 maps to 0: inputs in [-1, 1], matching the generator's tanh output.
GAN_MEAN, GAN_STD = 0.5, 0.5


def _norm(channels: int) -> nn.Module:
    # The reference implementation's "instance" norm: no affine parameters, no running statistics.
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), _norm(dim), nn.ReLU(True),
                                   nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), _norm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """The CycleGAN ResNet generator (c7s1-ngf, d2ngf, d4ngf, n_blocks x R4ngf, u2ngf, ungf, c7s1-1)."""

    def __init__(self, channels: int = 1, ngf: int = 64, n_blocks: int = 9):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(channels, ngf, 7), _norm(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1), _norm(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                       _norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """The 70x70 PatchGAN (``n_layers=3``): an N x 1 x H' x W' map of real/fake scores (LSGAN: no sigmoid)."""

    def __init__(self, channels: int = 1, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1), _norm(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights(module: nn.Module, gain: float = 0.02) -> nn.Module:
    """The reference initialisation: conv weights ~ N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def default_blocks(image_size: int) -> int:
    """Residual blocks of the published defaults: 9 from 256 px up, 6 below."""
    return 9 if image_size >= 256 else 6


def receptive_field(n_layers: int = 3) -> int:
    """Input pixels one PatchGAN output sees (70 for the default three layers)."""
    rf = 1
    for kernel, stride in reversed([(4, 2)] * n_layers + [(4, 1), (4, 1)]):
        rf = (rf - 1) * stride + kernel
    return rf


def gan_spec(image_size: int, working_size: int = 512, intensity: str = "none") -> PreprocessSpec:
    """The resolved preprocessing of a CycleGAN run: 1 grey channel mapped to [-1, 1], stretched square."""
    from pydantic import ValidationError

    try:
        return PreprocessSpec(image_size=image_size, working_size=working_size, intensity=intensity, resize="stretch",
                              channels=1, mean=(GAN_MEAN,), std=(GAN_STD,))
    except ValidationError as exc:
        raise ConfigError(f"synth preprocessing: {exc.errors()[0]['msg']}") from None


# ---------------------------------------------------------------------------- record


class GeneratorFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SynthRecord(BaseModel):
    """``run.json`` of a CycleGAN: the networks, the two domains, preprocessing, generator hashes, provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["covidcxr-synth/1"] = SYNTH_FORMAT
    kind: Literal["cyclegan"] = "cyclegan"
    ngf: int = Field(ge=1)
    n_blocks: int = Field(ge=0)
    ndf: int = Field(ge=1)
    n_layers: int = Field(ge=1)
    preprocess: PreprocessSpec
    #: ``{"a": {"name": ..., "filter": {...}}, "b": {...}}``: what each domain is, as manifest filters.
    domains: dict
    generators: dict[Literal["a2b", "b2a"], GeneratorFile]
    config: dict = {}
    data: dict = {}
    history: dict = {}
    info: dict = {}
    integrity: Optional[Integrity] = None


def _synth_format(path: Path, raw) -> None:
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt != SYNTH_FORMAT:
        raise CovidCXRError(f"{path}: run format {fmt!r} is not a CycleGAN run ({SYNTH_FORMAT!r}); "
                            "train one with `covidcxr synth train`")


def read_synth_record(run_dir: str | Path, *, verify: bool = True) -> SynthRecord:
    """Read and integrity-check a CycleGAN run's ``run.json``."""
    return read_sealed_record(run_dir, SynthRecord, verify=verify, check_format=_synth_format, what="CycleGAN record",
                              missing=f"not a CycleGAN run directory (no {RUN_JSON}); train one with "
                                      "`covidcxr synth train`")


def save_synth_run(run_dir: str | Path, generators: dict[str, nn.Module], **fields) -> SynthRecord:
    """Write both generators (safetensors) and the sealed ``run.json`` with their SHA-256."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for direction in DIRECTIONS:
        path = run_dir / GENERATOR_FILES[direction]
        save_weights(path, generators[direction])
        files[direction] = GeneratorFile(file=path.name, sha256=sha256_file(path))
    return write_run_record(run_dir, SynthRecord(generators=files, **fields))


# ---------------------------------------------------------------------------- inference


@dataclass
class LoadedGenerator:
    """One direction of a CycleGAN run, ready to translate decoded X-rays."""

    model: nn.Module
    spec: PreprocessSpec
    direction: str
    sha256: str
    record: SynthRecord | None = None

    def prepared(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded float H x W image -> the S x S uint16 generator input (the project's pipeline)."""
        return prepare(working_image(pixels, self.spec.working_size), self.spec)

    @torch.no_grad()
    def translate_prepared(self, prepared: list[np.ndarray]) -> np.ndarray:
        """Prepared S x S images -> translated S x S float32 images in [0, 1]."""
        if not len(prepared):
            return np.zeros((0, self.spec.image_size, self.spec.image_size), np.float32)
        batch = torch.stack([to_tensor(p, self.spec) for p in prepared])
        self.model.eval()
        out = self.model(batch)[:, 0].clamp(-1, 1)
        return ((out + 1) / 2).numpy().astype(np.float32)

    def translate(self, images: list[np.ndarray], batch_size: int = 8, keep_aspect: bool = True) -> list[np.ndarray]:
        """Decoded float images -> translated float images in [0, 1]; with ``keep_aspect`` each is stretched
        back to its source's aspect ratio (longer side = the run's image size), else S x S."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            for src, y in zip(chunk, self.translate_prepared([self.prepared(p) for p in chunk])):
                out.append(restore_aspect(y, src.shape[:2]) if keep_aspect else y)
        return out


def restore_aspect(square: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An S x S (stretched) image back to the H x W aspect ratio, longer side S."""
    s = square.shape[0]
    h, w = shape
    scale = s / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(square, size, interpolation=cv2.INTER_AREA) if size != (s, s) else square


def build_generator(record: SynthRecord) -> ResnetGenerator:
    return ResnetGenerator(int(record.preprocess.channels), record.ngf, record.n_blocks)


def load_generator(run_dir: str | Path, direction: str = "a2b") -> LoadedGenerator:
    """One generator of a CycleGAN run; refuses an edited record and weights that do not match it."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction {direction!r}: use one of {list(DIRECTIONS)}")
    run_dir = Path(run_dir)
    record = read_synth_record(run_dir)
    entry = record.generators[direction]
    path = run_dir / entry.file
    verify_recorded_file(path, entry.sha256, what="generator")
    from safetensors.torch import load_file

    model = build_generator(record)
    model.load_state_dict(load_file(str(path)), strict=True)
    return LoadedGenerator(model=model.eval(), spec=record.preprocess, direction=direction, sha256=entry.sha256,
                           record=record)
