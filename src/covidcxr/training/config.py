"""Training configuration: a YAML file validated with pydantic, overridable key by key.

``load_config("configs/quick.yaml", ["model.name=resnet18", "train.epochs=3"])`` reads the YAML,
applies the dotted ``key=value`` overrides (values parsed as YAML, so ``3`` is an int and
``[a, b]`` a list), expands ``${COVIDCXR_DATA_ROOT}`` / ``${COVIDCXR_WEIGHTS_DIR}`` /
``${COVIDCXR_CACHE_DIR}`` (defaults from :mod:`covidcxr.paths`, so one config works in CI and for
users) and any other ``${VAR}`` from the environment, then validates. Every error names the key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidcxr import paths
from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.errors import ConfigError

#: Device names ``train.device`` accepts (``cuda:N`` too).
DEVICE_TYPES = ("auto", "cpu", "cuda", "mps")


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a config must never be silently ignored. Numbers must be
    # finite (``lr: .inf`` is refused) and a boolean is never a number (``lr: true`` is not 1.0).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data):
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is not None and isinstance(value, bool) and not _allows_bool(field.annotation):
                    raise ValueError(f"{name}: {value!r} is a boolean, not a number; give a number")
        return data


def _allows_bool(annotation) -> bool:
    import typing

    if annotation is bool:
        return True
    return any(_allows_bool(a) for a in typing.get_args(annotation))


class DataConfig(_Section):
    manifest: str = "${COVIDCXR_DATA_ROOT}/manifest.csv"
    label_space: str = "binary"  # binary | 3class | path to a YAML mapping
    split_column: str = "split"
    # Only used when the manifest has no split column: split it here (patient-grouped) and record it.
    split_seed: Optional[int] = None
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    holdout_sources: list[str] = []
    # Cap on validation images (stratified by label x source, seeded); None = all of them.
    val_max_images: Optional[int] = Field(None, ge=10)
    # decode: read every image once before training and skip (and report) unreadable ones;
    # exists: only check the files exist (faster; a later decode failure stops training with the file name).
    validate_images: Literal["decode", "exists"] = "decode"
    # Manifest rows must resolve inside the manifest's folder or the data root; true lifts that.
    allow_outside_root: bool = False
    # Synthetic images (`covidcxr synth generate`) added to the training rows only (never val / test), at
    # most synthetic_max of them (seeded); each must come from a training patient (training/synthetic_rows.py).
    synthetic_manifest: Optional[str] = None
    synthetic_max: Optional[int] = Field(None, ge=0)
    # The lung segmenter for preprocess.roi=lungs: "default" (shipped with covidcxr) or a segmenter run
    # directory (`covidcxr segment train`). Copied into RUN/segmenter and pinned by its SHA-256.
    lung_segmenter: str = "default"


class ModelConfig(_Section):
    name: str = "tf_efficientnet_lite0"
    weights: str = "none"  # none | imagenet | path to .safetensors / .pth
    weights_sha256: Optional[str] = None
    channels: Literal[1, 3] = 3
    finetune: Literal["full", "linear", "last_k"] = "full"
    last_k: int = Field(1, ge=1)
    backbone_lr_mult: float = Field(1.0, ge=0)


class AugmentConfig(_Section):
    enabled: bool = True
    rotation_deg: float = Field(10.0, ge=0, le=45)
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = Field(0.06, ge=0, le=0.3)
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    hflip_p: float = Field(0.0, ge=0, le=1)  # off by default: the heart is on the left
    # Strong intensity augmentation against per-source contrast / sharpness / noise signatures.
    strong_intensity: bool = False
    gamma: tuple[float, float] = (0.7, 1.5)
    blur_p: float = Field(0.3, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_p: float = Field(0.3, ge=0, le=1)
    noise_std: float = Field(0.03, ge=0, le=0.5)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_p: float = Field(1.0, ge=0, le=1)  # probability a batch is mixed when an alpha > 0
    # Storage / format augmentation, for every class alike: JPEG re-compression at a quality drawn
    # uniformly from jpeg_quality (integers 1-100), optionally of the image first enlarged by a factor
    # from jpeg_scale (compressing a larger original, whose 8x8 blocks shrink with it); and a
    # downscale-upscale round trip to a side of S x a factor from resolution_scale. Off by default.
    jpeg_p: float = Field(0.0, ge=0, le=1)
    jpeg_quality: tuple[int, int] = (30, 95)
    jpeg_scale: tuple[float, float] = (1.0, 1.0)
    resolution_p: float = Field(0.0, ge=0, le=1)
    resolution_scale: tuple[float, float] = (0.4, 1.0)
    # Where the storage augmentation runs: "prepared" (the S x S image after intensity + resize, like
    # the rest), or "working" (the working-size image before intensity standardisation and resize,
    # which is where a re-saved file's compression actually enters the pipeline).
    storage_stage: Literal["prepared", "working"] = "prepared"

    @field_validator("scale", "gamma", "blur_sigma")
    @classmethod
    def _ordered(cls, v):
        if v[0] > v[1] or v[0] <= 0:
            raise ValueError(f"need 0 < low <= high, got {list(v)}")
        return v

    @field_validator("jpeg_quality", mode="before")
    @classmethod
    def _quality(cls, v):
        if isinstance(v, (list, tuple)) and len(v) == 2:
            if any(isinstance(q, bool) or not isinstance(q, int) for q in v):
                raise ValueError(f"need two whole numbers 1 <= low <= high <= 100, got {list(v)}")
            if not 1 <= v[0] <= v[1] <= 100:
                raise ValueError(f"need 1 <= low <= high <= 100, got {list(v)}")
        return v

    @field_validator("jpeg_scale")
    @classmethod
    def _jpeg_scale(cls, v):
        if not 1.0 <= v[0] <= v[1] <= 4.0:
            raise ValueError(f"need 1 <= low <= high <= 4, got {list(v)}")
        return v

    @field_validator("resolution_scale")
    @classmethod
    def _resolution_scale(cls, v):
        if not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"need 0 < low <= high <= 1, got {list(v)}")
        return v


class TrainConfig(_Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.5, ge=0)
    step_epochs: int = Field(10, ge=1)
    step_gamma: float = Field(0.1, gt=0, le=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=2)
    samples_per_epoch: Optional[int] = Field(None, ge=2)  # None: one pass over the training images
    grad_clip: Optional[float] = Field(1.0, gt=0)
    patience: Optional[int] = Field(5, ge=1)  # early stopping on the selection metric; None: off
    min_delta: float = Field(0.0, ge=0)
    selection_metric: Literal["auc", "within_source_auc", "val_loss"] = "within_source_auc"
    loss_weighting: Literal["none", "class_weighted"] = "none"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Training objective (covidcxr.training.objectives, docs/training.md): ce; group_dro over (source,
    # class) cells (step dro_eta); within_source_auc, pairwise loss on same-source pairs + auc_ce_weight x CE;
    # label_decomposition (3class, sampler source_balanced; covidcxr.training.decomposition).
    objective: Literal["ce", "group_dro", "within_source_auc", "label_decomposition"] = "ce"
    dro_eta: float = Field(0.05, gt=0)
    auc_ce_weight: float = Field(0.5, ge=0)
    auc_abnormal_weight: float = Field(0.0, ge=0)  # within_source_auc: pneumonia-above-normal pairs too; 0: off
    decomposition_covid_weight: float = Field(1.0, gt=0)
    # Source-adversarial training (DANN; covidcxr.training.adversarial): a source classifier on the
    # penultimate features behind a gradient-reversal layer, its CE added to the objective with
    # coefficient lambda = weight (constant) or weight * (2 / (1 + exp(-10 p)) - 1) (dann, p = training
    # progress 0-1). 0 = off. hidden: 0 = linear adversary, N = one hidden ReLU layer of N units.
    source_adversarial_weight: float = Field(0.0, ge=0)
    source_adversarial_schedule: Literal["constant", "dann"] = "dann"
    source_adversarial_hidden: int = Field(0, ge=0)
    # LP-FT: the first lp_epochs epochs train the head only (backbone frozen, its BatchNorm in eval
    # mode) at lp_lr (None: lr), then model.finetune trains with the backbone at lr x model.backbone_lr_mult,
    # the schedule (warm-up + cosine / step) restarting for the remaining epochs. 0: off.
    lp_epochs: int = Field(0, ge=0)
    lp_lr: Optional[float] = Field(None, gt=0)
    sampler: Literal["none", "balanced", "source_balanced"] = "source_balanced"
    # Relative draw weight of sources that hold one class only (see docs/training.md); 0 drops them.
    single_class_source_weight: float = Field(1.0, ge=0)
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # NHWC: on CPU too, 1.4-1.5x faster for depthwise nets (EfficientNet, MobileNet)
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    deterministic: bool = True
    threads: Optional[int] = Field(None, ge=1)  # torch CPU threads; None: torch's default
    tensorboard: bool = False
    threshold_method: Literal["youden", "sensitivity"] = "youden"
    threshold_target: Optional[float] = Field(None, gt=0, lt=1)
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        kind, _, index = v.partition(":")
        if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (index and kind in ("auto", "cpu")):
            raise ValueError(f"unknown device {v!r}; use one of auto, cpu, cuda, cuda:N, mps")
        return v

    @model_validator(mode="after")
    def _threshold_target(self):
        if self.threshold_method == "sensitivity" and self.threshold_target is None:
            raise ValueError("threshold_method 'sensitivity' needs threshold_target (e.g. 0.95)")
        return self


class EnsembleConfig(_Section):
    folds: Optional[int] = Field(None, ge=2)  # k-fold ensemble (also: `covidcxr train --folds K`)
    seeds: list[Annotated[int, Field(ge=0, lt=1000)]] = []  # seed ensemble, e.g. [0, 1, 2]: see member_seeds
    fold_column: str = "fold"
    tta: list[Literal["hflip"]] = []  # test-time augmentation recorded in the run, applied at inference


class TrainingConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    preprocess: PreprocessSpec = PreprocessSpec()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    ensemble: EnsembleConfig = EnsembleConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def member_seeds(self) -> list[int]:
        """Each seed-ensemble member's training seed, train.seed x 1000 + s: so train.seed changes the members."""
        return [self.train.seed * 1000 + s for s in self.ensemble.seeds]

    @model_validator(mode="after")
    def _combinations(self):
        t, a = self.train, self.augment
        if self.ensemble.folds and self.ensemble.seeds:
            raise ValueError("ensemble.folds and ensemble.seeds: choose one kind of ensemble (k-fold members train on "
                             "different rows, seed members on the same rows)")
        if t.lp_epochs and t.lp_epochs >= t.epochs:
            raise ValueError(f"train.lp_epochs ({t.lp_epochs}) must be smaller than train.epochs ({t.epochs}): "
                             "LP-FT needs at least one fine-tuning epoch after the linear probe")
        if t.lp_epochs and self.model.finetune == "linear":
            raise ValueError("train.lp_epochs needs model.finetune full or last_k (with finetune=linear the whole "
                             "run is already a linear probe)")
        if t.objective != "ce" and a.enabled and (a.mixup_alpha > 0 or a.cutmix_alpha > 0):
            raise ValueError(f"train.objective={t.objective} works on per-image labels; it cannot be combined "
                             "with augment.mixup_alpha / augment.cutmix_alpha (set them to 0)")
        if t.auc_abnormal_weight > 0 and t.objective != "within_source_auc":
            raise ValueError(f"train.auc_abnormal_weight is a term of objective within_source_auc, not {t.objective}")
        if t.objective == "label_decomposition" and t.sampler != "source_balanced":
            raise ValueError("train.objective=label_decomposition needs train.sampler=source_balanced: it balances "
                             "the classes inside each source, so that no source predicts a label in either contrast")
        if t.source_adversarial_weight > 0 and a.enabled and (a.mixup_alpha > 0 or a.cutmix_alpha > 0):
            raise ValueError("train.source_adversarial_weight > 0 needs one source per image; it cannot be combined "
                             "with augment.mixup_alpha / augment.cutmix_alpha (set them to 0)")
        return self


# ---------------------------------------------------------------- loading

_ENV_DEFAULTS = {
    paths.DATA_ROOT_ENV: paths.data_root,
    paths.WEIGHTS_DIR_ENV: paths.weights_dir,
    paths.CACHE_DIR_ENV: paths.cache_dir,
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_vars(value: str, key: str = "") -> str:
    """Expand ``${VAR}``; covidcxr's own variables fall back to :mod:`covidcxr.paths` defaults."""

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if os.environ.get(name):
            return os.environ[name]
        if name in _ENV_DEFAULTS:
            return str(_ENV_DEFAULTS[name]())
        raise ConfigError(f"config key {key or '?'}: environment variable {name} is not set (used in {value!r})")

    return _VAR.sub(repl, value)


def _expand_tree(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _expand_tree(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand_tree(v, key) for v in obj]
    if isinstance(obj, str):
        return expand_vars(obj, key)
    return obj


def _known_keys(model: type[BaseModel] = TrainingConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def parse_override(item: str, example: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value parsed as YAML)``; ConfigErrors name the override."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. {example}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), (yaml.safe_load(raw) if raw.strip() else None)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc


def set_dotted(tree: dict, key: str, value: Any, item: str) -> None:
    """``tree[a][b] = value`` for ``key = "a.b"``, creating sections; a non-section on the way is an error."""
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[leaf] = value


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """Apply ``section.key=value`` strings to a config dict (values parsed as YAML)."""
    known = _known_keys()
    for item in overrides or []:
        key, value = parse_override(item, "train.epochs=3")
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=3)
            raise ConfigError(f"override {item!r}: unknown config key {key!r}"
                              + (f"; did you mean {', '.join(hint)}?" if hint else f"; known keys: {', '.join(known)}"))
        set_dotted(tree, key, value, item)
    return tree


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(key, _known_keys(), n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]}?)" if hint else "")
        got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and not isinstance(err.get("input"), dict) else ""
        parts.append(f"config key {key}: {msg}{got}")
    return f"{origin}: " + "; ".join(parts)


def validate_config(tree: dict | None, origin: str = "config") -> TrainingConfig:
    """Validate a config dict (already overridden); raises ConfigError naming each bad key."""
    try:
        # Expand ${VAR} after filling in defaults, so default paths resolve too.
        filled = TrainingConfig.model_validate(_expand_tree(tree or {})).model_dump(mode="json")
        return TrainingConfig.model_validate(_expand_tree(filled))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None


def read_yaml_mapping(path: Path, *, missing: str, not_a_mapping: str) -> dict:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: {missing}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: {not_a_mapping}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainingConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides."""
    tree: dict = {}
    origin = "config"
    if path is not None:
        path = Path(path)
        origin = str(path)
        tree = read_yaml_mapping(path, missing="config file not found (examples are in configs/)",
                                 not_a_mapping="the top level must be a mapping of sections (data, model, train, ...)")
    return validate_config(apply_overrides(tree, overrides), origin)


def dump_config(config: TrainingConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
