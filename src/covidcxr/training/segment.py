"""Train the lung segmenter (``covidcxr segment train``) and write its run directory.

Data: the shared v7labs + lungVAE lung masks (:mod:`covidcxr.training.segment_data`), split by patient.
Model: :func:`covidcxr.models.segmenter.build_segmenter` (U-Net, MobileNetV2 encoder from the shared
ImageNet weights). Loss: BCE + soft Dice, both with "ignore" pixels weighted 0. The epoch with the best
validation Dice is kept. The held-out (test) patients are scored in the stored images' geometry with
MONAI's Dice and HD95, next to a trivial baseline (the training masks' majority template), both with
patient-bootstrap 95% CIs (:mod:`covidcxr.evaluation.segmentation`).

The run directory: ``model.safetensors``, ``run.json`` (sealed :class:`SegmenterRecord`: config,
data hash, split hash, metrics), ``split.csv``, ``test_scores.csv``, ``history.csv``.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from covidcxr.errors import ConfigError, CovidCXRError, validation_problems
from covidcxr.evaluation.segmentation import (mask_scores, score_masks, summarise_scores, template_for,
                                              template_mask)
from covidcxr.files import write_csv
from covidcxr.models.record import RUN_JSON, SPLIT_FILE, RunSplit
from covidcxr.models.segmenter import (ENCODER_FILE, ENCODER_SHA256, LoadedSegmenter, build_segmenter,
                                       save_segmenter, segmenter_spec)
from covidcxr.paths import data_root, weights_dir
from covidcxr.progress import make_progress
from covidcxr.training.config import parse_override, read_yaml_mapping
from covidcxr.training.segment_data import augment, data_hash, load_samples, mask_table, split_masks

SCORES_FILE = "test_scores.csv"
HISTORY_FILE = "history.csv"


class SegmentConfig(BaseModel):
    """Everything ``covidcxr segment train`` takes (a flat YAML mapping, or key=value overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(256, ge=32, le=1024)
    working_size: int = Field(512, ge=32, le=4096)
    intensity: Literal["none", "minmax", "percentile", "hist_eq", "clahe"] = "clahe"
    kinds: list[Literal["v7labs", "lungvae"]] = ["v7labs", "lungvae"]
    max_masks: Optional[int] = Field(None, ge=4)  # a patient-grouped subset (tests, quick runs)
    val: float = Field(0.15, gt=0, lt=0.5)
    test: float = Field(0.2, gt=0, lt=0.5)
    seed: int = 0
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = True
    threads: Optional[int] = Field(None, ge=1)
    encoder_weights: Optional[str] = None  # default <weights dir>/mobilenet_v2_...pth; "none": random init
    data_root: Optional[str] = None  # default $COVIDCXR_DATA_ROOT or ../shared/data/cxr
    n_boot: int = Field(1000, ge=100)
    progress: bool = True


def load_segment_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SegmentConfig:
    """A flat YAML file (or the defaults) plus ``key=value`` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        tree = read_yaml_mapping(Path(path), missing="segmenter config file not found",
                                 not_a_mapping="a segmenter config is a mapping of SegmentConfig fields")
    for item in overrides or []:
        key, value = parse_override(item, "epochs=3")
        tree[key] = value
    try:
        return SegmentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("segmenter config: " + validation_problems(exc, unknown_key="unknown key")) from None


def _encoder_path(cfg: SegmentConfig) -> Path | None:
    if cfg.encoder_weights is not None and cfg.encoder_weights.lower() == "none":
        return None
    return Path(cfg.encoder_weights) if cfg.encoder_weights else weights_dir() / ENCODER_FILE


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, both over the weighted (non-"ignore") pixels only."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp_min(1.0)
    prob = torch.sigmoid(logits) * weight
    inter = (prob * target * weight).sum()
    dice = (2 * inter + 1.0) / (prob.sum() + (target * weight).sum() + 1.0)
    return bce + (1.0 - dice)


def _batches(samples, batch_size, rng, spec, train: bool):
    from covidcxr.data.preprocess import to_tensor

    order = rng.permutation(len(samples)) if train else np.arange(len(samples))
    for i in range(0, len(order), batch_size):
        xs, ys, ws = [], [], []
        for j in order[i:i + batch_size]:
            s = samples[j]
            if train:
                x, y, w = augment(s.prepared, s.target, s.weight, rng)
            else:
                x, y, w = s.prepared, s.target, s.weight
            xs.append(to_tensor(x, spec))
            ys.append(torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)))
            ws.append(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        yield torch.stack(xs), torch.stack(ys)[:, None], torch.stack(ws)[:, None]


def _square_dice(seg: LoadedSegmenter, samples) -> float:
    """Mean Dice at the model's input size (model selection on validation patients; MONAI's Dice)."""
    if not samples:
        return float("nan")
    probs = np.concatenate([seg.probabilities([s.prepared for s in samples[i:i + 16]])
                            for i in range(0, len(samples), 16)])
    return float(np.mean([mask_scores(p >= seg.threshold, s.target >= 0.5, s.weight > 0, hd95=False)[0]
                          for p, s in zip(probs, samples)]))


def _held_out(seg: LoadedSegmenter, samples, template: np.ndarray) -> tuple[pd.DataFrame, list[np.ndarray]]:
    preds = []
    for i in range(0, len(samples), 8):
        chunk = samples[i:i + 8]
        probs = seg.probabilities([s.prepared for s in chunk])
        preds += [seg.mask_from_probability(p, s.lung.shape) for p, s in zip(probs, chunk)]
    scores = score_masks(preds, [s.lung for s in samples], [s.valid for s in samples])
    base = score_masks([template_for(template, s.lung.shape) for s in samples], [s.lung for s in samples],
                       [s.valid for s in samples])
    frame = pd.DataFrame({"image": [s.image for s in samples], "patient_id": [s.patient_id for s in samples],
                          "kind": [s.kind for s in samples], "dice": scores["dice"], "hd95_px": scores["hd95"],
                          "baseline_dice": base["dice"], "baseline_hd95_px": base["hd95"],
                          "lung_fraction_pred": [float(p[s.valid].mean()) for p, s in zip(preds, samples)],
                          "lung_fraction_ref": [float(s.lung[s.valid].mean()) for s in samples]})
    return frame, preds


def train_segmenter(cfg: SegmentConfig, out: str | Path) -> dict:
    """Train, select, score and write the segmenter run directory ``out``; returns the record's metrics."""
    out = Path(out)
    if (out / RUN_JSON).exists():
        raise CovidCXRError(f"{out}: already holds a run ({RUN_JSON}); choose a new --out")
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    root = Path(cfg.data_root) if cfg.data_root else data_root()
    spec = segmenter_spec(cfg.image_size, cfg.working_size, cfg.intensity)
    table = split_masks(mask_table(root, cfg.kinds), val=cfg.val, test=cfg.test, seed=cfg.seed,
                        max_masks=cfg.max_masks, root=root)
    progress = make_progress("img", disable=not cfg.progress)
    with progress:
        task = progress.add_task("reading masks", total=len(table))
        samples, skipped = load_samples(table, root, spec, progress=lambda: progress.advance(task))
        parts = {k: [s for s in samples if s.split == k] for k in ("train", "val", "test")}
        if not parts["train"] or not parts["test"]:
            raise CovidCXRError(f"{len(samples)} usable masks leave no train or no test patients; use more masks")
        encoder = _encoder_path(cfg)
        model = build_segmenter(encoder)
        seg = LoadedSegmenter(model=model, spec=spec)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * -(-len(parts["train"]) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
        task = progress.add_task("training", total=cfg.epochs * len(parts["train"]))
        history, best = [], (-1.0, None, 0)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            losses = []
            for x, y, w in _batches(parts["train"], cfg.batch_size, rng, spec, train=cfg.augment):
                loss = _loss(model(x), y, w)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                progress.advance(task, len(x))
            val_dice = _square_dice(seg, parts["val"] or parts["train"])
            history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val_dice,
                            "seconds": round(time.time() - started, 1)})
            progress.update(task, description=f"training (epoch {epoch}: loss {history[-1]['loss']:.3f}, "
                                              f"val Dice {val_dice:.3f})")
            if val_dice > best[0]:
                best = (val_dice, copy.deepcopy(model.state_dict()), epoch)
        model.load_state_dict(best[1])
        model.eval()
        template = template_mask([s.target >= 0.5 for s in parts["train"]], [s.weight for s in parts["train"]])
        scores, _ = _held_out(seg, parts["test"], template)
    patients = scores["patient_id"].to_numpy()
    model_scores = pd.DataFrame({"dice": scores["dice"], "hd95": scores["hd95_px"]})
    base_scores = pd.DataFrame({"dice": scores["baseline_dice"], "hd95": scores["baseline_hd95_px"]})
    metrics = {"test": summarise_scores(model_scores, patients, n_boot=cfg.n_boot),
               "baseline_template": summarise_scores(base_scores, patients, n_boot=cfg.n_boot),
               "test_by_kind": {k: {"n_images": int(len(g)), "dice_mean": float(g["dice"].mean()),
                                    "hd95_px_mean": float(g["hd95_px"].mean())} for k, g in scores.groupby("kind")},
               "selection": {"metric": "val_dice", "epoch": best[2], "value": best[0]},
               "evaluated_at": "stored image geometry (longer side <= 512 px)", "model_input_px": cfg.image_size}
    out.mkdir(parents=True, exist_ok=True)
    split_rows = pd.DataFrame({"image": [s.image for s in samples], "patient_id": [s.patient_id for s in samples],
                               "kind": [s.kind for s in samples], "split": [s.split for s in samples]})
    write_csv(out / SPLIT_FILE, split_rows)
    write_csv(out / SCORES_FILE, scores, float_format="%.6g")
    write_csv(out / HISTORY_FILE, pd.DataFrame(history))
    import monai
    import segmentation_models_pytorch as smp

    data = {"root": str(root), "manifest_sha256": _sha(root / "manifest.csv"),
            "annotation_index_sha256": _sha(root / "annotations" / "index.csv"),
            "masks_sha256": data_hash(table[table["key"].isin({s.image for s in samples})], root),
            "kinds": {k: int(v) for k, v in split_rows["kind"].value_counts().items()},
            "images": len(samples), "patients": int(split_rows["patient_id"].nunique()),
            "skipped": [{"image": i, "reason": r} for i, r in skipped]}
    counts = {k: int(v) for k, v in split_rows["split"].value_counts().items()}
    record = save_segmenter(
        out, model, preprocess=spec, config=cfg.model_dump(mode="json"), data=data,
        encoder_init={"file": str(encoder), "sha256": ENCODER_SHA256} if encoder else {"file": None},
        split=RunSplit(sha256=_sha(out / SPLIT_FILE), column="split", counts=counts), metrics=metrics,
        info={"history": history, "wall_s": round(time.time() - started, 1), "torch": torch.__version__,
              "segmentation_models_pytorch": smp.__version__, "monai": monai.__version__,
              "threads": torch.get_num_threads()})
    return record.metrics


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_segmenter_command(out: str | Path, config: str | Path | None, overrides: list[str]) -> str:
    """``covidcxr segment train``: train and return a short human summary."""
    m = train_segmenter(load_segment_config(config, overrides), out)
    t, b = m["test"], m["baseline_template"]
    return (f"held-out patients: {t['n_patients']} ({t['n_images']} images): Dice {t['dice']['mean']:.3f} "
            f"[{t['dice']['ci_low']:.3f}, {t['dice']['ci_high']:.3f}], HD95 {t['hd95_px']['mean']:.1f} px "
            f"[{t['hd95_px']['ci_low']:.1f}, {t['hd95_px']['ci_high']:.1f}]; template baseline Dice "
            f"{b['dice']['mean']:.3f}. Run written to {out}")
