"""The training loop: one model, one run directory.

``fit(config, out_dir)`` trains on the manifest's ``train`` rows, selects the checkpoint on the
``val`` rows (never ``test``) with ``train.selection_metric`` (plain AUC, within-source AUC or val
loss), chooses the decision threshold on the same validation predictions and writes a complete run
directory (see docs/training.md):

    run.json, model.safetensors   the model (covidcxr.models.run.save_model) + selection/threshold/data record
    config.yaml                   the resolved configuration
    labels.json                   classes, positive class, how manifest labels map to classes
    metrics.jsonl                 one JSON line per epoch (losses, val AUC, within-source AUC, lr, speed)
    metrics.png                   the same as curves
    val_predictions.csv           validation probabilities of the selected checkpoint
    data_counts.csv               images per label x source x split of the training manifest
    audit.json                    data audit of the training manifest (near-duplicates off: fast)
    MODEL_CARD.md                 intended use, data, validation metrics, limitations
    checkpoints/last.pt           full state after the last finished epoch (resume)
    checkpoints/best.safetensors  weights of the best epoch so far

Resume (``resume=True``) continues from ``checkpoints/last.pt``: model, optimizer, scheduler,
RNG states, early-stopping state and history. Because every epoch's randomness is derived from
``(seed, epoch)`` the resumed epochs are bit-identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

import io
import json
import logging
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from covidcxr.data.dataset import CXRDataset
from covidcxr.data.labels import LabelSpace, get_label_space
from covidcxr.data.manifest import Manifest
from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.models.finetune import apply_finetune, param_groups
from covidcxr.models.registry import create_model, default_preprocess
from covidcxr.models.run import atomic_write_bytes, save_model, save_weights, write_json
from covidcxr.training.augment import BatchMixer, build_augmentation
from covidcxr.training.config import TrainingConfig, dump_config
from covidcxr.training.sampling import epoch_rng, make_batch_sampler, source_balanced_cell_weights
from covidcxr.plotting import pyplot

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CKPT = "last.pt"
BEST_WEIGHTS = "best.safetensors"
METRICS_FILE = "metrics.jsonl"
HIGHER_IS_BETTER = {"auc": True, "within_source_auc": True, "val_loss": False}


# ---------------------------------------------------------------- data

@dataclass
class TrainingData:
    """The manifest a run trains on and which of its rows are train / val."""

    manifest: Manifest
    train_mask: np.ndarray
    val_mask: np.ndarray
    split_info: dict


def _split_values(manifest: Manifest, column: str) -> pd.Series:
    if column not in manifest.table.columns:
        raise ConfigError(f"config key data.split_column: the manifest has no column {column!r}")
    return manifest.table[column].astype(str)


def prepare_training_data(config: TrainingConfig, manifest: Manifest | None = None) -> TrainingData:
    """Read the manifest (or use ``manifest``), split it if needed, and pick train / val rows."""
    d = config.data
    if manifest is None:
        manifest = Manifest.read(d.manifest)
    info: dict = {"split_column": d.split_column}
    split = _split_values(manifest, d.split_column) if d.split_column in manifest.table.columns else None
    if split is None or (split == "").all():
        if d.split_seed is None:
            raise ConfigError(
                f"{manifest.name}: no {d.split_column!r} split assigned. Run `covidcxr data split` first, "
                "or set data.split_seed=N to split here (patient-grouped, stratified by label x source)")
        from covidcxr.data.splits import assign_splits

        manifest = assign_splits(manifest, val=d.val_fraction, test=d.test_fraction, seed=d.split_seed,
                                 holdout_sources=d.holdout_sources)
        info.update(split_created_here=True, split_seed=d.split_seed, val_fraction=d.val_fraction,
                    test_fraction=d.test_fraction, holdout_sources=list(d.holdout_sources))
        split = manifest.table["split"].astype(str)
    else:
        info["split_created_here"] = False
        unassigned = (split == "") | (split == "nan")
        if unassigned.any():
            # e.g. a newly imported source concatenated to a split manifest: training would silently skip it.
            first = manifest.table["image"].iloc[int(np.flatnonzero(unassigned.to_numpy())[0])]
            raise ConfigError(
                f"{manifest.name}: {int(unassigned.sum())} of {len(split)} rows have no {d.split_column!r} value "
                f"(e.g. {first}); they would be left out of training unnoticed. Assign them (`covidcxr data split` "
                "re-splits every row, or fill the column by patient), or drop them from the manifest")
    held_out = np.zeros(len(manifest), dtype=bool)
    if d.holdout_sources:
        from covidcxr.data.splits import source_mask

        held_out = source_mask(manifest.table, d.holdout_sources)
        # A patient with images in a held-out source is held out everywhere (as assign_splits does).
        held_out |= manifest.table["patient_id"].isin(set(manifest.table.loc[held_out, "patient_id"])).to_numpy()
        info["holdout_sources"] = list(d.holdout_sources)
    train_mask = (split == "train").to_numpy() & ~held_out
    val_mask = (split == "val").to_numpy() & ~held_out
    if d.val_max_images and val_mask.sum() > d.val_max_images:
        val_mask = _stratified_cap(manifest.table, val_mask, d.val_max_images, config.train.seed)
        info["val_capped_to"] = int(val_mask.sum())
    if not train_mask.any() or not val_mask.any():
        raise ConfigError(f"{manifest.name}: need rows with {d.split_column}=train and =val "
                          f"(found {int(train_mask.sum())} train, {int(val_mask.sum())} val)")
    return TrainingData(manifest, train_mask, val_mask, info)


def _stratified_cap(table: pd.DataFrame, mask: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Keep about ``cap`` rows of ``mask``, proportionally per label x source (at least 1 per cell)."""
    rng = np.random.default_rng([seed, 7])
    rows = np.flatnonzero(mask)
    cells = table.iloc[rows].groupby(["label", "source"]).indices
    frac = cap / len(rows)
    keep = np.zeros_like(mask)
    for _, idx in sorted(cells.items()):
        n = max(1, int(round(len(idx) * frac)))
        keep[rows[rng.choice(idx, size=min(n, len(idx)), replace=False)]] = True
    return keep


def build_spec(config: TrainingConfig) -> PreprocessSpec:
    """The preprocessing spec: the config's size / intensity plus the architecture's normalisation."""
    p, m = config.preprocess, config.model
    return default_preprocess(m.name, p.image_size, m.channels, p.intensity, resize=p.resize,
                              percentiles=tuple(p.percentiles), clahe_clip=p.clahe_clip, clahe_tiles=p.clahe_tiles)


# ---------------------------------------------------------------- model / optimiser

def build_model(config: TrainingConfig, num_classes: int) -> tuple[nn.Module, list[dict], dict]:
    """Model with pretrained backbone (if asked), fine-tuning mode applied (frozen BatchNorm stays in
    eval mode), optimiser param groups, and the fine-tuning plan for the run record."""
    m, t = config.model, config.train
    weights = None if m.weights in ("", "none", None) else m.weights
    model = create_model(m.name, num_classes, channels=m.channels, weights=weights, weights_sha256=m.weights_sha256)
    plan = apply_finetune(model, m.name, mode=m.finetune, last_k=m.last_k)
    groups = param_groups(model, m.name, lr=t.lr, backbone_lr_mult=m.backbone_lr_mult, weight_decay=t.weight_decay)
    return model, groups, plan.to_dict()


def build_optimizer(config: TrainingConfig, groups: list[dict]) -> torch.optim.Optimizer:
    t = config.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, schedule: str, warmup_epochs: float,
              step_epochs: int = 10, step_gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (linear warm-up, then schedule)."""
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(warmup_epochs * steps_per_epoch))
    if step < warm:
        return (step + 1) / (warm + 1)
    if schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return step_gamma ** (step // (steps_per_epoch * step_epochs))
    return 1.0


def build_scheduler(config: TrainingConfig, optimizer, steps_per_epoch: int):
    t = config.train
    kw = dict(steps_per_epoch=steps_per_epoch, epochs=t.epochs, schedule=t.schedule, warmup_epochs=t.warmup_epochs,
              step_epochs=t.step_epochs, step_gamma=t.step_gamma)
    # A plain function (not a callable object) keeps the scheduler state free of pickled objects,
    # so the checkpoint loads with torch.load(weights_only=True).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, **kw))


def class_loss_weights(config: TrainingConfig, dataset: CXRDataset) -> torch.Tensor | None:
    """``class_weighted``: weights that make every class contribute equally under the chosen sampler."""
    if config.train.loss_weighting == "none":
        return None
    k = len(dataset.classes)
    labels = dataset.targets
    if config.train.sampler == "balanced":
        freq = np.full(k, 1.0 / k)
    elif config.train.sampler == "source_balanced":
        cells = source_balanced_cell_weights(labels, dataset.sources, config.train.single_class_source_weight)
        freq = np.zeros(k)
        for (_, c), w in cells.items():
            freq[c] += w
    else:
        freq = np.bincount(labels, minlength=k) / len(labels)
    w = np.where(freq > 0, 1.0 / (k * np.maximum(freq, 1e-12)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


# ---------------------------------------------------------------- metrics

def positive_scores(probs: np.ndarray, classes: Sequence[str], positive: str | None) -> np.ndarray | None:
    if positive is None or positive not in classes:
        return None
    return probs[:, list(classes).index(positive)]


def validation_metrics(probs: np.ndarray, targets: np.ndarray, sources: np.ndarray, classes: Sequence[str],
                       positive: str | None) -> dict:
    """Val loss, AUC (positive vs rest, or macro one-vs-rest), within-source AUC and per-source AUCs."""
    from sklearn.metrics import roc_auc_score

    from covidcxr.evaluation.metrics import within_source_auc

    out: dict = {"val_loss": float(F.nll_loss(torch.from_numpy(np.log(np.clip(probs, 1e-12, 1))).float(),
                                               torch.from_numpy(np.array(targets, dtype=np.int64))).item())}
    out["val_accuracy"] = float((probs.argmax(1) == targets).mean())
    score = positive_scores(probs, classes, positive)
    if score is not None:
        y = (targets == list(classes).index(positive)).astype(int)
        out["val_auc"] = float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")
        out["val_within_source_auc"] = float(within_source_auc(y, score, sources))
        per_source = {}
        for s in sorted(set(sources)):
            m = sources == s
            if 0 < y[m].sum() < m.sum():
                per_source[str(s)] = {"auc": float(roc_auc_score(y[m], score[m])), "n": int(m.sum()),
                                      "n_pos": int(y[m].sum())}
        out["val_auc_per_source"] = per_source
    else:
        present = np.unique(targets)
        out["val_auc"] = float(roc_auc_score(targets, probs, multi_class="ovr", labels=list(range(len(classes))))) \
            if len(present) == len(classes) else float("nan")
        out["val_within_source_auc"] = float("nan")
    return out


def selection_value(metrics: dict, name: str) -> float:
    return metrics["val_loss"] if name == "val_loss" else metrics[f"val_{name}"]


def _is_better(value: float, best: float | None, name: str, min_delta: float) -> bool:
    if value is None or not np.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if HIGHER_IS_BETTER[name] else value < best - min_delta


# ---------------------------------------------------------------- device / determinism

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


# ---------------------------------------------------------------- checkpoints

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


# ---------------------------------------------------------------- epochs

def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: CXRDataset, *, batch_size: int, device: torch.device,
                    amp: bool = False, channels_last: bool = False, num_workers: int = 0,
                    tta: Sequence[str] = ()) -> np.ndarray:
    """Class probabilities for every item of ``dataset`` (no augmentation), in dataset order."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    for x, _, _ in loader:
        x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with _autocast(device, amp):
            p = model(x).float().softmax(1)
            if "hflip" in tta:
                p = (p + model(torch.flip(x, dims=[3])).float().softmax(1)) / 2
        out.append(p.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(dataset.classes)), dtype=np.float32)


def _collate(batch):
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), torch.tensor(idx, dtype=torch.long)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def train_one_epoch(model, loader, optimizer, scheduler, mixer: BatchMixer, loss_weights, *, device, config: TrainingConfig,
                    progress, epoch: int) -> dict:
    t = config.train
    model.train()  # frozen BatchNorm layers stay in eval mode (hooks from apply_finetune)
    cl = device.type == "cuda" and t.channels_last
    total_loss, n_seen, t0 = 0.0, 0, time.perf_counter()
    task = progress.add_task(f"epoch {epoch + 1}/{t.epochs}", total=len(loader) * loader.batch_sampler.batch_size,
                             loss=float("nan"))
    weights = loss_weights.to(device) if loss_weights is not None else None
    for x, y, _ in loader:
        x = x.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
        y = y.to(device)
        x, soft = mixer(x, y)
        with _autocast(device, t.amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), soft, weight=weights, label_smoothing=t.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        total_loss += float(loss.item()) * len(y)
        n_seen += len(y)
        progress.update(task, advance=len(y), loss=total_loss / n_seen)
    seconds = time.perf_counter() - t0
    return {"train_loss": total_loss / max(1, n_seen), "train_images": n_seen, "train_seconds": seconds,
            "images_per_s": n_seen / seconds if seconds > 0 else float("nan")}


# ---------------------------------------------------------------- the run

def fit(config: TrainingConfig, out_dir: str | Path, *, manifest: Manifest | None = None, resume: bool = False,
        data: TrainingData | None = None, write_card: bool = True, extra_info: dict | None = None) -> Path:
    """Train one model as ``config`` says and write the run directory ``out_dir`` (returned).

    ``manifest`` replaces reading ``config.data.manifest``; ``data`` fixes the train / val rows
    (k-fold members). Process-wide torch settings changed for the run (deterministic algorithms,
    thread count) are restored afterwards.
    """
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return _fit(config, out_dir, manifest=manifest, resume=resume, data=data, write_card=write_card,
                    extra_info=extra_info)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _fit(config: TrainingConfig, out_dir: str | Path, *, manifest: Manifest | None, resume: bool,
         data: TrainingData | None, write_card: bool, extra_info: dict | None) -> Path:
    from covidcxr.progress import make_progress

    started = time.perf_counter()
    out_dir = Path(out_dir)
    t = config.train
    ckpt_dir = out_dir / CHECKPOINT_DIR
    last_path = ckpt_dir / LAST_CKPT
    if not resume and last_path.exists():
        raise CovidCXRError(f"{out_dir}: already holds a training run; pass --resume to continue it "
                            "or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(config)
    if resume and (out_dir / "config.yaml").is_file() and (out_dir / "config.yaml").read_text() != config_text:
        raise CovidCXRError(f"{out_dir / 'config.yaml'}: the run was started with another configuration; "
                            "resume with the same config and overrides")
    atomic_write_bytes(out_dir / "config.yaml", config_text.encode())

    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = resolve_device(t.device)

    data = data or prepare_training_data(config, manifest)
    space: LabelSpace = get_label_space(config.data.label_space)
    spec = build_spec(config)
    # The model first: missing / mismatching weights should stop a run before images are read.
    seed_everything(t.seed, epoch=10**6)  # the new head's initial weights (a stream no epoch uses)
    model, groups, finetune_plan = build_model(config, len(space.classes))
    train_ds = CXRDataset(data.manifest.subset(mask=data.train_mask), space, spec,
                          augment=build_augmentation(config.augment), validate=config.data.validate_images,
                          progress=t.progress)
    val_ds = CXRDataset(data.manifest.subset(mask=data.val_mask), space, spec, validate=config.data.validate_images,
                        progress=t.progress)
    if len(train_ds) < 2 or len(val_ds) < 2:
        raise ConfigError(f"too few usable images: {len(train_ds)} train, {len(val_ds)} val")
    positive = space.positive
    missing = [c for i, c in enumerate(space.classes) if not (train_ds.targets == i).any()]
    if missing:
        raise ConfigError(f"{data.manifest.name}: the {len(train_ds)} training images hold no {', '.join(missing)} "
                          f"(label space {space.name!r}, classes {list(space.classes)}); the model could never learn "
                          "that class. Add data with it, or use a label space without it")
    _check_selection_possible(config, val_ds, positive)

    model.to(device)
    if device.type == "cuda" and t.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, groups)
    sampler = make_batch_sampler(t.sampler, list(train_ds.targets), list(train_ds.sources), t.batch_size,
                                 t.samples_per_epoch, t.seed, t.single_class_source_weight)
    steps_per_epoch = len(sampler)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    loss_weights = class_loss_weights(config, train_ds)
    mixer = BatchMixer.from_config(config.augment, len(space.classes))
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=t.num_workers, collate_fn=_collate,
                        worker_init_fn=_worker_init if t.num_workers else None,
                        persistent_workers=t.num_workers > 0)  # workers keep their prepared-image cache

    start_epoch, best, best_epoch, bad_epochs, history = 0, None, None, 0, []
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, best, best_epoch = int(ckpt["epoch"]), ckpt["best_value"], ckpt["best_epoch"]
        bad_epochs, history = int(ckpt["bad_epochs"]), [json.loads(h) for h in ckpt["history"]]
        log.info("resuming %s after epoch %d", out_dir, start_epoch)
    # metrics.jsonl holds exactly the finished epochs (a killed epoch's line, if any, is dropped).
    atomic_write_bytes(out_dir / METRICS_FILE, "".join(_json_line(h) for h in history).encode())

    writer = _tensorboard(out_dir) if t.tensorboard else None
    stopped_early = bool(history and history[-1].get("stop"))
    with make_progress("img", disable=not t.progress, extra="loss {task.fields[loss]:.4f}") as progress:
        for epoch in range(start_epoch, t.epochs):
            if stopped_early:
                break
            seed_everything(t.seed, epoch)
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            record = {"epoch": epoch + 1, "lr": lr}
            record.update(train_one_epoch(model, loader, optimizer, scheduler, mixer, loss_weights, device=device,
                                          config=config, progress=progress, epoch=epoch))
            tv = time.perf_counter()
            probs = predict_dataset(model, val_ds, batch_size=t.batch_size * 2, device=device, amp=t.amp,
                                    channels_last=device.type == "cuda" and t.channels_last, tta=config.ensemble.tta)
            record.update(validation_metrics(probs, val_ds.targets, val_ds.sources, space.classes, positive))
            record["val_seconds"] = time.perf_counter() - tv
            value = selection_value(record, t.selection_metric)
            if _is_better(value, best, t.selection_metric, t.min_delta):
                best, best_epoch, bad_epochs = value, epoch + 1, 0
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                save_weights(ckpt_dir / BEST_WEIGHTS, model)
                _write_val_predictions(out_dir, val_ds, probs)
                record["selected"] = True
            else:
                bad_epochs += 1
                record["selected"] = False
            if t.patience and bad_epochs >= t.patience and epoch + 1 < t.epochs:
                record["stop"] = True
                stopped_early = True
            history.append(record)
            with open(out_dir / METRICS_FILE, "a") as f:
                f.write(_json_line(record))
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        writer.add_scalar(k, v, epoch + 1)
            save_checkpoint(last_path, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "best_value": best,
                "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "history": [json.dumps(h) for h in history],
            })
            if t.progress:
                progress.console.print(epoch_summary(record), highlight=False)
    if writer is not None:
        writer.close()
    if best_epoch is None:
        raise CovidCXRError(f"{out_dir}: no epoch produced a finite {t.selection_metric}; nothing to save")
    return finalize_run(config, out_dir, model, spec, space, train_ds, val_ds, data, history, best, best_epoch,
                        stopped_early, time.perf_counter() - started, device, write_card,
                        {"finetune": finetune_plan, **(extra_info or {})})


def epoch_summary(record: dict) -> str:
    """One console line per epoch: the validation metrics that checkpoint selection looks at."""
    parts = [f"epoch {record['epoch']}"]
    for key, name in (("train_loss", "train loss"), ("val_loss", "val loss"), ("val_auc", "val AUC"),
                      ("val_within_source_auc", "val within-source AUC")):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{name} {record[key]:.3f}")
    if record.get("selected"):
        parts.append("(best so far: checkpoint kept)")
    return "  " + " | ".join(parts)


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    return v


def _json_line(record: dict) -> str:
    """One strict-JSON line (NaN -> null)."""
    return json.dumps(_finite_or_none(record)) + "\n"


def _check_selection_possible(config: TrainingConfig, val_ds: CXRDataset, positive: str | None) -> None:
    """Fail before training when the selection metric cannot be computed on this validation set."""
    if config.train.selection_metric == "auc":
        # AUC is NaN on every epoch when validation lacks a class: no checkpoint could ever be
        # selected, and the run would only fail after its last epoch.
        if positive is not None:
            present = set(np.unique(val_ds.targets == val_ds.classes.index(positive)))
            missing = [n for v, n in ((True, positive), (False, f"non-{positive}")) if v not in present]
        else:
            missing = [c for i, c in enumerate(val_ds.classes) if i not in set(np.unique(val_ds.targets))]
        if missing:
            raise ConfigError(f"config key train.selection_metric: auc needs every class in the validation rows, "
                              f"but {len(val_ds)} validation images hold no {', '.join(missing)}; "
                              "use val_loss, or another split")
        return
    if config.train.selection_metric != "within_source_auc":
        return
    if positive is None:
        raise ConfigError("config key train.selection_metric: within_source_auc needs a label space with a positive "
                          "class; use auc or val_loss")
    pos = val_ds.classes.index(positive)
    t = pd.DataFrame({"s": val_ds.sources, "y": val_ds.targets == pos})
    if not any(0 < g["y"].sum() < len(g) for _, g in t.groupby("s")):
        raise ConfigError("config key train.selection_metric: within_source_auc needs validation sources holding "
                          "both classes and none does; use auc or val_loss, or another split")


def _write_val_predictions(out_dir: Path, ds: CXRDataset, probs: np.ndarray) -> None:
    table = ds.table[["image", "patient_id", "source", "label"]].copy()
    table.insert(0, "row", ds.rows)
    table["target"] = [ds.classes[t] for t in ds.targets]
    for j, c in enumerate(ds.classes):
        table[f"p_{c}"] = probs[:, j]
    atomic_write_bytes(out_dir / "val_predictions.csv", table.to_csv(index=False, lineterminator="\n").encode())


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard: tensorboard is not installed (pip install covidcxr[tensorboard]); skipping")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def data_counts(manifest: Manifest, space: LabelSpace, split_column: str = "split") -> pd.DataFrame:
    """Images per class x source x split (the class after the label space; excluded rows as '(excluded)')."""
    t = manifest.table
    cls = space.assign(t).fillna("(excluded)")
    split = t[split_column] if split_column in t.columns else pd.Series([""] * len(t))
    return (pd.DataFrame({"class": cls.to_numpy(), "source": t["source"].to_numpy(), "split": split.to_numpy()})
            .groupby(["class", "source", "split"]).size().rename("images").reset_index())


def choose_threshold(config: TrainingConfig, y: np.ndarray, score: np.ndarray) -> tuple[float | None, dict]:
    from covidcxr.evaluation.thresholds import select_threshold

    t = config.train
    if score is None or not (0 < y.sum() < len(y)):
        return None, {"method": None, "reason": "no positive class or validation lacks a class"}
    value = float(select_threshold(y, score, method=t.threshold_method, target=t.threshold_target))
    pred = score >= value
    return value, {"method": t.threshold_method, "target": t.threshold_target, "value": value, "chosen_on": "val",
                   "n_val": int(len(y)), "val_sensitivity": float(pred[y == 1].mean()),
                   "val_specificity": float((~pred[y == 0]).mean())}


def finalize_run(config: TrainingConfig, out_dir: Path, model: nn.Module, spec: PreprocessSpec, space: LabelSpace,
                 train_ds: CXRDataset, val_ds: CXRDataset, data: TrainingData, history: list[dict], best: float,
                 best_epoch: int, stopped_early: bool, seconds: float, device: torch.device, write_card: bool,
                 extra_info: dict | None) -> Path:
    """Best weights -> model.safetensors + run.json with threshold, selection record and data provenance."""
    from safetensors.torch import load_file

    import covidcxr

    model.load_state_dict(load_file(str(out_dir / CHECKPOINT_DIR / BEST_WEIGHTS)))
    model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    preds = pd.read_csv(out_dir / "val_predictions.csv")
    probs = preds[[f"p_{c}" for c in space.classes]].to_numpy()
    score = positive_scores(probs, space.classes, space.positive)
    y = (val_ds.targets == space.classes.index(space.positive)).astype(int) if score is not None else None
    threshold, threshold_info = choose_threshold(config, y, score)
    best_record = next(h for h in history if h["epoch"] == best_epoch)
    # The column the rows were taken from: data.split_column, unless the split was made here (into "split").
    split_column = "split" if data.split_info.get("split_created_here") or config.data.split_column not in \
        data.manifest.table.columns else config.data.split_column
    counts = data_counts(data.manifest, space, split_column)
    atomic_write_bytes(out_dir / "data_counts.csv", counts.to_csv(index=False, lineterminator="\n").encode())
    labels = {"label_space": space.to_dict(), "class_index": {c: i for i, c in enumerate(space.classes)},
              "manifest_label_to_class": _label_map(space)}
    write_json(out_dir / "labels.json", labels)
    audit = _audit(data.manifest, out_dir)
    info = {
        "selection": {"metric": config.train.selection_metric, "value": best, "epoch": best_epoch,
                      "split": "val", "higher_is_better": HIGHER_IS_BETTER[config.train.selection_metric]},
        "val_metrics": {k: v for k, v in best_record.items() if k.startswith("val_")},
        "threshold": threshold_info,
        "epochs_run": len(history), "epochs_planned": config.train.epochs, "stopped_early": stopped_early,
        "tta": list(config.ensemble.tta),
        "training_manifest": {"path": str(config.data.manifest), "name": data.manifest.name,
                              "sha256": data.manifest.sha256(), "rows": len(data.manifest),
                              "counts": counts.to_dict(orient="records")},
        "split": data.split_info,
        "data": {"train": train_ds.report(), "val": val_ds.report(), "train_images": len(train_ds),
                 "val_images": len(val_ds)},
        "audit": audit,
        "label_space": space.to_dict(),
        "model": config.model.model_dump(mode="json"),
        "sampler": config.train.sampler,
        "seed": config.train.seed,
        "wall_time_s": seconds,
        "device": str(device),
        "versions": {"covidcxr": covidcxr.__version__, "torch": torch.__version__, "python": platform.python_version()},
        **(extra_info or {}),
    }
    save_model(out_dir, model, architecture=config.model.name, classes=space.classes, preprocess_spec=spec,
               positive_class=space.positive, threshold=threshold, info=info)
    if config.ensemble.tta:
        from covidcxr.models.run import update_run_record

        update_run_record(out_dir, tta=list(config.ensemble.tta))
    _plot_history(out_dir, history, config.train.selection_metric, best_epoch)
    if write_card:
        from covidcxr.training.model_card import write_model_card

        write_model_card(out_dir)
    return out_dir


def _label_map(space: LabelSpace) -> dict:
    from covidcxr.data.manifest import LABELS

    t = pd.DataFrame({"label": list(LABELS), "finding": [""] * len(LABELS)})
    return {lab: (c if isinstance(c, str) else None) for lab, c in zip(LABELS, space.assign(t))}


def _audit(manifest: Manifest, out_dir: Path) -> dict:
    """Audit summary (the full report goes to audit.json); near-duplicate search off to stay fast."""
    try:
        from covidcxr.data.audit import audit_manifest
    except ImportError:
        return {"available": False}
    try:
        report = audit_manifest(manifest, duplicates=False, progress=False)
    except CovidCXRError as exc:
        return {"available": False, "error": str(exc)}
    report.write_json(out_dir / "audit.json")
    return {"available": True, "file": "audit.json", "ok": report.ok,
            "findings": [{"check": f.check, "severity": f.severity, "message": f.message}
                         for f in report.findings if f.severity in ("error", "warning")]}


def _plot_history(out_dir: Path, history: list[dict], metric: str, best_epoch: int) -> None:
    plt = pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val loss")
    a.set_xlabel("epoch"), a.legend(), a.set_title("loss")
    b.plot(ep, [h.get("val_auc") for h in history], "o-", label="val AUC")
    b.plot(ep, [h.get("val_within_source_auc") for h in history], "o-", label="val within-source AUC")
    b.axvline(best_epoch, color="grey", ls="--", label=f"selected ({metric})")
    b.set_xlabel("epoch"), b.set_ylim(0, 1.02), b.legend(loc="lower right"), b.set_title("validation")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out_dir / "metrics.png", buf.getvalue())
