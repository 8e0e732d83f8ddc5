"""``covidcxr synth train`` configuration: two domains as manifest filters, the CycleGAN defaults, the run.

A config is a YAML mapping of :class:`SynthConfig` fields (plus ``key=value`` overrides, values parsed
as YAML; ``domain_a.filter.label=normal`` reaches into the nested mappings). Defaults are the published
CycleGAN ones: ResNet generator with 64 base filters (9 residual blocks from 256 px, 6 below), 70x70
PatchGAN with 64, LSGAN, cycle weight 10, identity weight 0.5 (x the cycle weight), Adam 2e-4 with
beta1 0.5, batch size 1, an image buffer of 50, and a learning rate held for the first half of the
steps and decayed linearly to zero over the second half.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidcxr.errors import ConfigError, validation_problems
from covidcxr.training.config import expand_vars, parse_override, read_yaml_mapping, set_dotted

FilterValue = Union[str, int, float, list[Union[str, int, float]]]


class DomainConfig(BaseModel):
    """One image domain: every manifest row where each ``column: value`` of ``filter`` holds (a list: any of)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9._-]+$")
    filter: dict[str, FilterValue] = Field(min_length=1)

    def values(self) -> dict[str, list[str]]:
        """The filter with every value as a list of text (manifest cells are text)."""
        return {k: [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in self.filter.items()}


class SynthConfig(BaseModel):
    """Everything ``covidcxr synth train`` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    manifest: str = Field("${COVIDCXR_DATA_ROOT}/manifest.csv", validate_default=True)
    domain_a: DomainConfig
    domain_b: DomainConfig
    #: Rows of these splits train the GAN; with no split assigned yet, ``split_seed`` splits here (by patient).
    train_splits: list[Literal["train", "val", "test", "external"]] = ["train"]
    split_seed: Optional[int] = None
    max_images: Optional[int] = Field(None, ge=2)  # per domain, a seeded sample (tests, quick runs)
    image_size: int = Field(256, ge=32, le=1024)
    working_size: int = Field(512, ge=32, le=4096)
    # "none": the stored grey values, so generated files look like stored images and a classifier's own
    # preprocessing (e.g. CLAHE) applies to them exactly once.
    intensity: Literal["none", "minmax", "percentile", "hist_eq", "clahe"] = "none"
    # Random crop after enlarging by this share (published: load 286, crop 256 -> 0.117); hflip off: the
    # heart is on the left.
    jitter: float = Field(0.117, ge=0, le=0.5)
    hflip: bool = False
    ngf: int = Field(64, ge=1, le=256)
    ndf: int = Field(64, ge=1, le=256)
    n_blocks: Optional[int] = Field(None, ge=0, le=32)  # None: 9 from 256 px, 6 below
    n_layers: int = Field(3, ge=1, le=5)  # 3: the 70x70 PatchGAN
    lambda_cycle: float = Field(10.0, ge=0)
    lambda_identity: float = Field(0.5, ge=0)  # times lambda_cycle, as in the reference implementation
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)
    batch_size: int = Field(1, ge=1)
    pool_size: int = Field(50, ge=0)
    steps: int = Field(20000, ge=1)
    decay_steps: Optional[int] = Field(None, ge=0)  # None: the second half of the steps
    seed: int = 0
    threads: Optional[int] = Field(None, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(500, ge=1)  # a contact sheet of translations every N steps
    sample_images: int = Field(4, ge=1, le=16)
    #: Stop (cleanly, with a complete run directory) after this many seconds of training.
    max_seconds: Optional[float] = Field(None, gt=0)
    progress: bool = True

    @field_validator("manifest")
    @classmethod
    def _expand(cls, v):
        return expand_vars(v, "manifest")

    @model_validator(mode="after")
    def _consistent(self):
        if self.domain_a.name == self.domain_b.name:
            raise ValueError(f"domain_a and domain_b need different names (both {self.domain_a.name!r})")
        if self.domain_a.values() == self.domain_b.values():
            raise ValueError("domain_a and domain_b have the same filter: there is nothing to translate")
        if self.working_size < self.image_size:
            raise ValueError(f"working_size {self.working_size} is smaller than image_size {self.image_size}")
        if self.decay_steps is not None and self.decay_steps > self.steps:
            raise ValueError(f"decay_steps {self.decay_steps} is more than steps {self.steps}")
        if self.image_size % 4:
            raise ValueError(f"image_size {self.image_size}: must be a multiple of 4 (two stride-2 down-samplings)")
        return self

    @property
    def blocks(self) -> int:
        from covidcxr.models.cyclegan import default_blocks

        return self.n_blocks if self.n_blocks is not None else default_blocks(self.image_size)

    @property
    def decay(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.steps // 2


def load_synth_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SynthConfig:
    """A YAML mapping (or nothing) plus dotted ``key=value`` overrides, validated; errors name the key."""
    tree: dict = {}
    if path is not None:
        tree = read_yaml_mapping(Path(path), missing="synth config file not found (an example: configs/synth_normal_covid.yaml)",
                                 not_a_mapping="a synth config is a mapping of SynthConfig fields")
    for item in overrides or []:
        set_dotted(tree, *parse_override(item, "steps=1000"), item)
    try:
        return SynthConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("synth config: " + validation_problems(exc, unknown_key="unknown key")) from None


def dump_synth_config(cfg: SynthConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
