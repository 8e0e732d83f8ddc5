"""The training loop: one model, one run directory.

``fit(config, out_dir)`` trains on the manifest's ``train`` rows, selects the checkpoint on the
``val`` rows (never ``test``) with ``train.selection_metric`` (plain AUC, within-source AUC or val
loss), chooses the decision threshold on the same validation predictions and writes a complete run
directory (see docs/training.md):

    run.json, model.safetensors   the run record (covidcxr.models.record) + weights
    split.csv                     the rows the run was trained, validated and tested on
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

The parts live in their own modules: row selection (:mod:`.rows`), model / optimiser / schedule
(:mod:`.optim`), determinism and checkpoints (:mod:`.state`), validation and selection
(:mod:`.validation`) and the run record (:mod:`.finalize`). Resume (``resume=True``) continues from
``checkpoints/last.pt``; because every epoch's randomness is derived from ``(seed, epoch)`` the
resumed epochs are bit-identical to an uninterrupted run on CPU.

A run that fails (bad data, a loss that turns NaN) before its first checkpoint leaves no run
directory behind; one that fails later keeps its checkpoints for ``--resume`` and says why in
``FAILED.txt``.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from covidcxr.data.dataset import CXRDataset
from covidcxr.data.labels import LabelSpace, get_label_space
from covidcxr.data.manifest import Manifest
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import atomic_write_bytes, dumps_json
from covidcxr.models.finetune import apply_lpft_phase
from covidcxr.models.run import save_weights
from covidcxr.training.adversarial import SourceAdversary, build_adversary
from covidcxr.training.augment import BatchMixer, apply_seeded, build_augmentation
from covidcxr.training.config import TrainingConfig, dump_config
from covidcxr.training.distributed import (DistributedContext, check_distributed_config, join_process_group,
                                           shard_sampler, sync_batchnorm)
from covidcxr.training.finalize import finalize_run, write_val_predictions
from covidcxr.training.lung_roi import attach_lung_segmenter
from covidcxr.training.objectives import CrossEntropy, build_objective
from covidcxr.training.optim import build_model, build_optimizer, build_scheduler, build_spec, class_loss_weights
from covidcxr.training.rows import TrainingData, prepare_training_data
from covidcxr.training.sampling import make_batch_sampler
from covidcxr.training.storage import WorkingStageDataset
from covidcxr.training.state import (BEST_WEIGHTS, CHECKPOINT_DIR, LAST_CKPT, load_checkpoint, resolve_device,
                                     rng_state, save_checkpoint, seed_everything, set_rng_state)
from covidcxr.training.validation import (autocast, check_selection_possible, is_better, predict_dataset,
                                          selection_value, validation_metrics)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FAILED_FILE = "FAILED.txt"


class TrainingDiverged(CovidCXRError):
    """The loss became NaN or infinite; training stops at once."""


def _collate(batch):
    xs, ys, idx = zip(*batch)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), torch.tensor(idx, dtype=torch.long)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)


def train_one_epoch(model, loader, optimizer, scheduler, mixer: BatchMixer, objective: CrossEntropy,
                    item_groups: np.ndarray, *, device, config: TrainingConfig, progress, epoch: int,
                    adversary: SourceAdversary | None = None) -> dict:
    """One epoch; ``objective`` (covidcxr.training.objectives) gives the loss, ``item_groups`` the
    (source, class) cell id of every training item (group DRO, within-source pairs); ``adversary``
    (covidcxr.training.adversarial) adds the source-adversarial loss."""
    t = config.train
    model.train()  # frozen BatchNorm layers stay in eval mode (hooks from apply_finetune)
    cl = t.channels_last
    total_loss, n_seen, t0 = 0.0, 0, time.perf_counter()
    task = progress.add_task(f"epoch {epoch + 1}/{t.epochs}", total=len(loader) * loader.batch_sampler.batch_size,
                             loss=float("nan"))
    groups_all = torch.from_numpy(np.asarray(item_groups, dtype=np.int64))
    for x, y, idx in loader:
        x = x.to(device, memory_format=torch.channels_last if cl else torch.contiguous_format)
        y = y.to(device)
        groups = groups_all[idx].to(device)
        x, soft = mixer(x, y)
        with autocast(device, t.amp):
            logits = model(x)
        loss = objective(logits.float(), soft, y, groups)
        if adversary is not None:
            loss = loss + adversary.loss(idx)
        if not torch.isfinite(loss):
            raise TrainingDiverged(_divergence_message(config, epoch, n_seen // max(1, len(y)) + 1, logits))
        optimizer.zero_grad(set_to_none=True)
        if adversary is not None:
            adversary.zero_grad()
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        if adversary is not None:
            adversary.optimizer_step(t.grad_clip)
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
    out_dir = Path(out_dir)
    existed = out_dir.exists()
    ctx = join_process_group()  # a torchrun job (covidcxr.training.distributed), else a plain run
    try:
        return _fit(config, out_dir, manifest=manifest, resume=resume, data=data, write_card=write_card,
                    extra_info=extra_info, ctx=ctx)
    except Exception as exc:
        if ctx.is_main:
            _mark_failed(out_dir, existed, exc)
        raise
    finally:
        ctx.close()
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _mark_failed(out_dir: Path, existed: bool, exc: Exception) -> None:
    """No half run directory: remove what this call created before any checkpoint, else say why it failed."""
    if not out_dir.is_dir():
        return
    if not existed and not (out_dir / CHECKPOINT_DIR / LAST_CKPT).exists():
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    if (out_dir / CHECKPOINT_DIR / LAST_CKPT).exists():
        atomic_write_bytes(out_dir / FAILED_FILE, (f"training failed: {exc.__class__.__name__}: {exc}\n"
                                                   "the checkpoints are kept; fix the cause and run again with "
                                                   "--resume\n").encode())


def _divergence_message(config: TrainingConfig, epoch: int, step: int, logits: torch.Tensor) -> str:
    t = config.train
    cause = ("the model's outputs are already NaN/inf: the initial weights (model.weights) probably hold NaN"
             if not torch.isfinite(logits).all() and epoch == 0 and step == 1 else
             f"the learning rate may be too high (train.lr={t.lr:g}), or an input or weight holds NaN")
    return (f"epoch {epoch + 1}, step {step}: the training loss is NaN or infinite; training stopped. "
            f"Likely cause: {cause}")


def _fit(config: TrainingConfig, out_dir: str | Path, *, manifest: Manifest | None, resume: bool,
         data: TrainingData | None, write_card: bool, extra_info: dict | None,
         ctx: DistributedContext = DistributedContext()) -> Path:
    from covidcxr.progress import make_progress

    started = time.perf_counter()
    t = config.train
    ckpt_dir = out_dir / CHECKPOINT_DIR
    last_path = ckpt_dir / LAST_CKPT
    check_distributed_config(config, ctx)
    if not resume and last_path.exists():
        raise CovidCXRError(f"{out_dir}: already holds a training run; pass --resume to continue it "
                            "or choose another --out")
    if ctx.is_main:  # in a DDP job rank 0 alone writes the run directory
        out_dir.mkdir(parents=True, exist_ok=True)
    config_text = dump_config(config)
    if resume and (out_dir / "config.yaml").is_file() and (out_dir / "config.yaml").read_text() != config_text:
        raise CovidCXRError(f"{out_dir / 'config.yaml'}: the run was started with another configuration; "
                            "resume with the same config and overrides")
    if ctx.is_main:
        atomic_write_bytes(out_dir / "config.yaml", config_text.encode())

    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = ctx.device(resolve_device(t.device))

    data = data or prepare_training_data(config, manifest)
    space: LabelSpace = get_label_space(config.data.label_space)
    spec, lung_finder = attach_lung_segmenter(config, build_spec(config), out_dir, write=ctx.is_main)
    # The model first: missing / mismatching weights should stop a run before images are read.
    seed_everything(t.seed, epoch=10**6)  # the new head's initial weights (a stream no epoch uses)
    model, groups, finetune_plan = build_model(config, len(space.classes))
    augmentation = build_augmentation(config.augment)
    a = config.augment
    working_stage = a.enabled and a.storage_stage == "working" and (a.jpeg_p > 0 or a.resolution_p > 0)
    train_kwargs = {"storage": a} if working_stage else {}
    train_ds = (WorkingStageDataset if working_stage else CXRDataset)(
        data.manifest.subset(mask=data.train_mask), space, spec,
        augment=functools.partial(apply_seeded, augmentation) if augmentation else None,
        validate=config.data.validate_images, progress=t.progress,
        allow_outside_root=config.data.allow_outside_root, lung_finder=lung_finder, **train_kwargs)
    val_ds = CXRDataset(data.manifest.subset(mask=data.val_mask), space, spec, validate=config.data.validate_images,
                        progress=t.progress, allow_outside_root=config.data.allow_outside_root,
                        lung_finder=lung_finder)
    if len(train_ds) < 2 or len(val_ds) < 2:
        raise ConfigError(f"too few usable images: {len(train_ds)} train, {len(val_ds)} val")
    positive = space.positive
    missing = [c for i, c in enumerate(space.classes) if not (train_ds.targets == i).any()]
    if missing:
        raise ConfigError(f"{data.manifest.name}: the {len(train_ds)} training images hold no {', '.join(missing)} "
                          f"(label space {space.name!r}, classes {list(space.classes)}); the model could never learn "
                          "that class. Add data with it, or use a label space without it")
    check_selection_possible(config, val_ds, positive)

    model = sync_batchnorm(model, ctx, device)
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, groups)
    sampler = shard_sampler(make_batch_sampler(t.sampler, list(train_ds.targets), list(train_ds.sources),
                                               t.batch_size, t.samples_per_epoch, t.seed,
                                               t.single_class_source_weight), ctx)
    steps_per_epoch = len(sampler)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    loss_weights = class_loss_weights(config, train_ds)
    objective, item_groups = build_objective(config, class_weights=loss_weights, sources=train_ds.sources,
                                             targets=train_ds.targets, classes=space.classes, positive=positive,
                                             labels=train_ds.table["label"].to_numpy())
    objective.to(device)
    mixer = BatchMixer.from_config(config.augment, len(space.classes))
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=t.num_workers, collate_fn=_collate,
                        worker_init_fn=_worker_init if t.num_workers else None,
                        persistent_workers=t.num_workers > 0)  # workers keep their prepared-image cache
    seed_everything(t.seed, epoch=10**6 + 1)  # the adversary's initial weights (a stream of its own)
    adversary = build_adversary(config, model, train_ds.sources, steps_per_epoch)
    if adversary is not None:
        adversary.to(device)

    start_epoch, best, best_epoch, bad_epochs, history = 0, None, None, 0, []
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, best, best_epoch = int(ckpt["epoch"]), ckpt["best_value"], ckpt["best_epoch"]
        bad_epochs, history = int(ckpt["bad_epochs"]), [json.loads(h) for h in ckpt["history"]]
        objective.load_state_dict(ckpt.get("objective", {}))
        if adversary is not None:
            adversary.load_state_dict(ckpt.get("adversary", {}))
        log.info("resuming %s after epoch %d", out_dir, start_epoch)
    # metrics.jsonl holds exactly the finished epochs (a killed epoch's line, if any, is dropped).
    if ctx.is_main:
        atomic_write_bytes(out_dir / METRICS_FILE, "".join(_json_line(h) for h in history).encode())

    writer = _tensorboard(out_dir) if t.tensorboard and ctx.is_main else None
    stopped_early = bool(history and history[-1].get("stop"))
    train_model = None
    show = t.progress and ctx.is_main
    with make_progress("img", disable=not show, extra="loss {task.fields[loss]:.4f}") as progress:
        for epoch in range(start_epoch, t.epochs):
            if stopped_early:
                break
            seed_everything(t.seed, epoch)
            sampler.set_epoch(epoch)
            record = {"epoch": epoch + 1}
            if t.lp_epochs:
                # LP-FT: the phase (frozen backbone or config.model.finetune) is a function of the epoch.
                plan = apply_lpft_phase(model, config.model.name, epoch, t.lp_epochs, config.model.finetune,
                                        config.model.last_k)
                record["phase"] = "linear_probe" if plan.mode == "linear" else "finetune"
            record["lr"] = optimizer.param_groups[0]["lr"]
            if train_model is None or t.lp_epochs:  # DDP registers the parameters that train this phase
                train_model = ctx.wrap(model, device)
            record.update(ctx.combine_epoch(train_one_epoch(
                train_model, loader, optimizer, scheduler, mixer, objective, item_groups, device=device,
                config=config, progress=progress, epoch=epoch, adversary=adversary)))
            if adversary is not None:
                record.update(adversary.epoch_metrics())
                adversary.reset_epoch()
            if t.objective == "group_dro":
                record["dro_group_weights"] = objective.summary()["group_weights"]
            if ctx.is_main:
                tv = time.perf_counter()
                probs = predict_dataset(model, val_ds, batch_size=t.batch_size * 2, device=device, amp=t.amp,
                                        channels_last=t.channels_last,
                                        tta=config.ensemble.tta)
                record.update(validation_metrics(probs, val_ds.targets, val_ds.sources, space.classes, positive))
                record["val_seconds"] = time.perf_counter() - tv
            record = ctx.broadcast(record)  # every rank takes rank 0's selection and early-stopping decision
            value = selection_value(record, t.selection_metric)
            if is_better(value, best, t.selection_metric, t.min_delta):
                best, best_epoch, bad_epochs = value, epoch + 1, 0
                if ctx.is_main:
                    ckpt_dir.mkdir(parents=True, exist_ok=True)
                    save_weights(ckpt_dir / BEST_WEIGHTS, model)
                    write_val_predictions(out_dir, val_ds, probs)
                record["selected"] = True
            else:
                bad_epochs += 1
                record["selected"] = False
            if t.patience and bad_epochs >= t.patience and epoch + 1 < t.epochs:
                record["stop"] = True
                stopped_early = True
            history.append(record)
            if not ctx.is_main:
                continue
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
                "history": [json.dumps(h) for h in history], "objective": objective.state_dict(),
                **({"adversary": adversary.state_dict()} if adversary is not None else {}),
            })
            if show:
                progress.console.print(epoch_summary(record), highlight=False)
    if writer is not None:
        writer.close()
    if adversary is not None:
        adversary.remove()  # training-only: the model leaves training without the feature hook
    if best_epoch is None:
        raise CovidCXRError(f"{out_dir}: no epoch produced a finite {t.selection_metric}; nothing to save")
    distributed = ctx.summary(model)
    if not ctx.is_main:
        ctx.barrier()  # returns once rank 0 has written the finished run
        return out_dir
    extra_info = {**(extra_info or {}), **({"distributed": distributed} if distributed else {})}
    run_dir = finalize_run(config, out_dir, model, spec, space, train_ds, val_ds, data, history, best, best_epoch,
                        stopped_early, time.perf_counter() - started, device, write_card,
                        {"finetune": finetune_plan, "objective": objective.summary(),
                         "source_adversary": adversary.summary() if adversary is not None else None,
                         "lp_ft": ({"lp_epochs": t.lp_epochs, "lp_lr": t.lp_lr or t.lr,
                                    "backbone_lr_mult": config.model.backbone_lr_mult} if t.lp_epochs else None),
                         **extra_info})
    ctx.barrier()
    return run_dir


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


def _json_line(record: dict) -> str:
    """One strict-JSON line (NaN -> null)."""
    return dumps_json(record) + "\n"


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("train.tensorboard: tensorboard is not installed (pip install covidcxr[tensorboard]); skipping")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))
