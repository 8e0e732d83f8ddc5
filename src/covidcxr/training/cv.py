"""Ensembles - k-fold (e.g. the Castiglioni protocol's 10 folds) and seed ensembles - and the one entry
point ``run_training``.

``train_kfold(config, out_dir, folds=K)``:

* folds come from the manifest's ``fold`` column (``covidcxr data split --folds K``); when it is
  missing (or holds another number of folds) they are made here over the development rows
  (``split`` train + val), patient-grouped and stratified by label x source
  (:func:`covidcxr.data.splits.assign_splits`), and recorded in the run;
* member k trains on the other folds and selects its checkpoint on fold k, in
  ``RUN_DIR/members/fold_k`` (a complete run directory of its own);
* the ensemble (``models.run.save_ensemble``: mean of the members' probabilities) gets its decision
  threshold from the out-of-fold validation predictions (``oof_predictions.csv``) - every
  development image scored by the member that did not train on it. Test rows are never used.
* ``ensemble.tta: [hflip]`` is recorded in each member's ``run.json`` (``tta``), so
  ``load_run`` applies the same test-time augmentation at inference.

``train_seed_ensemble(config, out_dir, seeds=[0, 1, 2])`` (config key ``ensemble.seeds``): one member
per training seed, in ``RUN_DIR/members/seed_S``, all on the same train / val rows. The members'
seeds are ``train.seed x 1000 + ensemble.seeds`` (``TrainingConfig.member_seeds``): train.seed 0 gives
the listed seeds, train.seed 1 the members 1000, 1001, ... Issue 10 measured
one recipe's external AUC swinging by up to 0.27 between training seeds; the mean of the members'
probabilities is what a user then gets instead of one draw. The threshold is chosen on the mean of the
members' validation predictions (``val_predictions.csv`` of the ensemble).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.labels import get_label_space
from covidcxr.data.manifest import Manifest
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import atomic_write_bytes
from covidcxr.models.record import RUN_JSON, read_run_record
from covidcxr.models.run import save_ensemble
from covidcxr.models.run_split import write_run_split
from covidcxr.training.config import TrainingConfig, dump_config, load_config
from covidcxr.training.distributed import torchrun_world_size
from covidcxr.training.loop import fit
from covidcxr.training.rows import TrainingData, data_counts, prepare_training_data, split_column_used
from covidcxr.training.state import CHECKPOINT_DIR, LAST_CKPT
from covidcxr.training.validation import choose_threshold, validation_metrics


def assign_folds(config: TrainingConfig, manifest: Manifest, folds: int) -> tuple[TrainingData, np.ndarray, dict]:
    """``(training data whose manifest has a fold column, development mask, info)`` for ``folds`` folds."""
    # Validates / creates the split and applies held-out sources. data.val_max_images caps a single
    # run's val split; here val rows are development data, so uncapped (else capped-off rows are lost).
    uncapped = config.model_copy(deep=True)
    uncapped.data.val_max_images = None
    base = prepare_training_data(uncapped, manifest)
    manifest = base.manifest
    dev = base.train_mask | base.val_mask
    col = config.ensemble.fold_column
    if col in manifest.table.columns:
        existing = manifest.table[col].to_numpy()
        values = sorted(set(int(v) for v in existing[dev]))
        if values == list(range(folds)):
            return base, dev, {"fold_column": col, "folds": folds, "folds_created_here": False}
    from covidcxr.data.splits import assign_splits

    seed = config.data.split_seed if config.data.split_seed is not None else config.train.seed
    dev_manifest = manifest.subset(mask=dev)
    with_folds = assign_splits(dev_manifest, val=0.0, test=0.0, seed=seed, folds=folds)
    fold = np.full(len(manifest), -1, dtype=int)
    fold[dev] = with_folds.table["fold"].to_numpy()
    table = manifest.table.copy()
    table[col] = fold
    base.manifest = manifest.replace(table)
    return base, dev, {"fold_column": col, "folds": folds, "folds_created_here": True,
                       "fold_seed": seed, "over": "train+val rows"}


def train_kfold(config: TrainingConfig, out_dir: str | Path, *, folds: int | None = None,
                manifest: Manifest | None = None, resume: bool = False) -> Path:
    """Train a ``folds``-fold patient-grouped ensemble into ``out_dir`` (see module docstring)."""
    out_dir = Path(out_dir)
    folds = folds or config.ensemble.folds
    if not folds or folds < 2:
        raise ConfigError("config key ensemble.folds: need >= 2 folds for a k-fold ensemble")
    _start_ensemble(config, out_dir, resume)
    base, dev, fold_info = assign_folds(config, manifest, folds)
    manifest = base.manifest
    col = config.ensemble.fold_column
    fold = manifest.table[col].to_numpy()
    members = []
    for k in range(folds):
        member_dir = out_dir / "members" / f"fold_{k}"
        members.append(member_dir)
        if (member_dir / RUN_JSON).is_file():
            continue  # finished before an interruption
        _announce(config, f"k-fold ensemble: member {k + 1} of {folds} (validates on fold {k})", member_dir)
        data = TrainingData(manifest, dev & (fold != k), dev & (fold == k), {**fold_info, "fold": k}, base.held_out)
        fit(config, member_dir, data=data, resume=resume and (member_dir / CHECKPOINT_DIR / LAST_CKPT).exists(),
            extra_info={"fold": k, "folds": folds})
    # Every development row trained some member; the ensemble's own split says so.
    whole = TrainingData(manifest, dev, np.zeros(len(manifest), dtype=bool), fold_info, base.held_out)
    oof = pd.concat([pd.read_csv(m / "val_predictions.csv").assign(fold=k) for k, m in enumerate(members)],
                    ignore_index=True)
    kind = {"kind": f"{len(members)}-fold", "folds": len(members), "combine": "mean probability", **fold_info}
    col = config.data.split_column  # the rows came from it, unless it was empty and the split made here ("split")
    col = col if col in manifest.table.columns and manifest.table[col].astype(str).ne("").any() else "split"
    return _write_ensemble(config, out_dir, members, whole, kind, oof, col, predictions_file="oof_predictions.csv",
                           val_kind="out-of-fold (each image scored by the member that did not train on it)",
                           chosen_on="out-of-fold validation predictions")


def train_seed_ensemble(config: TrainingConfig, out_dir: str | Path, *, seeds: list[int] | None = None,
                        manifest: Manifest | None = None, resume: bool = False) -> Path:
    """Train one member per training seed on the same train / val rows into ``out_dir`` (see module docstring)."""
    out_dir = Path(out_dir)
    seeds = [int(s) for s in seeds] if seeds is not None else config.member_seeds()
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"config key ensemble.seeds: need >= 2 different training seeds, got {seeds}")
    _start_ensemble(config, out_dir, resume)
    data = prepare_training_data(config, manifest)  # one split for every member
    members = []
    for i, s in enumerate(seeds):
        member = config.model_copy(deep=True)
        member.train.seed = s
        member.ensemble.seeds = []
        member_dir = out_dir / "members" / f"seed_{s}"
        members.append(member_dir)
        if (member_dir / RUN_JSON).is_file():
            continue  # finished before an interruption
        _announce(config, f"seed ensemble: member {i + 1} of {len(seeds)} (train.seed={s})", member_dir)
        fit(member, member_dir, data=data, resume=resume and (member_dir / CHECKPOINT_DIR / LAST_CKPT).exists(),
            extra_info={"seed_member": s, "seeds": seeds})
    val = _mean_predictions(members, get_label_space(config.data.label_space).classes)
    kind = {"kind": f"{len(seeds)}-seed", "seeds": seeds, "combine": "mean probability"}
    return _write_ensemble(config, out_dir, members, data, kind, val, split_column_used(config, data),
                           predictions_file="val_predictions.csv",
                           val_kind="the mean of the members' predictions on the shared validation rows",
                           chosen_on="the mean of the members' validation predictions")


def _announce(config: TrainingConfig, what: str, member_dir: Path) -> None:
    """Say which member trains now: each member shows its own progress bars, and there are several."""
    if config.train.progress:
        from rich.console import Console

        Console(stderr=True).print(f"{what} -> {member_dir}")


def _start_ensemble(config: TrainingConfig, out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a finished or partly trained ensemble; record the config (``config.yaml``)."""
    if (out_dir / RUN_JSON).exists() and not resume:
        raise CovidCXRError(f"{out_dir}: already holds a finished run; choose another --out")
    if not resume and any((out_dir / "members").glob(f"*/{CHECKPOINT_DIR}/{LAST_CKPT}")):
        raise CovidCXRError(f"{out_dir}: holds a partly trained ensemble; pass --resume to continue it")
    config_text = dump_config(config)
    # Finished members are skipped on resume, so a changed config would silently mix two trainings.
    if resume and (out_dir / "config.yaml").is_file() and (out_dir / "config.yaml").read_text() != config_text:
        raise CovidCXRError(f"{out_dir / 'config.yaml'}: the ensemble was started with another configuration; "
                            "resume with the same config and overrides")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "config.yaml", config_text.encode())


def _mean_predictions(members: list[Path], classes: list[str]) -> pd.DataFrame:
    """The members' validation predictions averaged row by row (the members must share their rows)."""
    tables = [pd.read_csv(m / "val_predictions.csv") for m in members]
    cols = [f"p_{c}" for c in classes]
    for m, t in zip(members[1:], tables[1:]):
        if not t["row"].equals(tables[0]["row"]) or not t["image"].equals(tables[0]["image"]):
            raise CovidCXRError(f"{m}/val_predictions.csv: not the same validation rows as {members[0]}")
    out = tables[0].copy()
    out[cols] = np.mean([t[cols].to_numpy() for t in tables], axis=0)
    return out


def _write_ensemble(config: TrainingConfig, out_dir: Path, members: list[Path], data: TrainingData, kind: dict,
                    val: pd.DataFrame, col: str, *, predictions_file: str, val_kind: str, chosen_on: str) -> Path:
    """The ensemble run over finished ``members``: threshold and metrics from ``val`` (the ensemble's
    validation predictions, written to ``predictions_file``), split, data counts, record and card."""
    manifest = data.manifest
    space = get_label_space(config.data.label_space)
    atomic_write_bytes(out_dir / predictions_file, val.to_csv(index=False, lineterminator="\n").encode())
    probs = val[[f"p_{c}" for c in space.classes]].to_numpy()
    targets = val["target"].map({c: i for i, c in enumerate(space.classes)}).to_numpy()
    val_metrics = validation_metrics(probs, targets, val["source"].to_numpy(), space.classes, space.positive)
    threshold, threshold_info = None, {"method": None}
    if space.positive is not None:
        y = (targets == space.classes.index(space.positive)).astype(int)
        threshold, threshold_info = choose_threshold(config, y, probs[:, space.classes.index(space.positive)])
        threshold_info["chosen_on"] = chosen_on
    counts = data_counts(manifest, space, col)
    atomic_write_bytes(out_dir / "data_counts.csv", counts.to_csv(index=False, lineterminator="\n").encode())
    member_info = [read_run_record(m).info for m in members]
    info = {
        "ensemble": kind,
        "selection": {"metric": config.train.selection_metric, "per_member": True,
                      "members": [mi["selection"] for mi in member_info]},
        "val_metrics": dict(val_metrics),
        "val_metrics_kind": val_kind,
        "threshold": threshold_info,
        "tta": list(config.ensemble.tta),
        "training_manifest": {"path": str(config.data.manifest), "name": manifest.name, "sha256": manifest.sha256(),
                              "rows": len(manifest), "counts": counts.to_dict(orient="records")},
        "split": data.split_info,
        "data": {"train_images": int(sum(mi["data"]["train_images"] for mi in member_info) / len(members)),
                 "val_images": int(len(val))},
        "audit": member_info[0].get("audit"),
        "model": config.model.model_dump(mode="json"),
        "sampler": config.train.sampler,
        "seed": kind.get("seeds", config.train.seed),
        "epochs_run": [mi["epochs_run"] for mi in member_info],
        "epochs_planned": config.train.epochs,
    }
    save_ensemble(out_dir, members, info=info, threshold=threshold, split=write_run_split(out_dir, manifest, data.run_split(col)))
    from covidcxr.training.model_card import write_model_card

    write_model_card(out_dir)
    return out_dir


def run_training(config_path: str | Path | None, out_dir: str | Path, *, overrides: list[str] | None = None,
                 resume: bool = False, folds: int | None = None, manifest: Manifest | None = None) -> Path:
    """What ``covidcxr train CONFIG --out DIR [--resume] [--folds K] [key=value ...]`` does."""
    config = load_config(config_path, overrides)
    if folds is not None:
        if config.ensemble.seeds:
            raise ConfigError(f"--folds {folds} with ensemble.seeds {config.ensemble.seeds}: choose one kind of ensemble")
        config.ensemble.folds = folds
    if (config.ensemble.seeds or config.ensemble.folds) and torchrun_world_size() > 1:
        # Every rank would write the ensemble's own files; its members are whole runs of their own.
        raise ConfigError(f"a torchrun (DDP) job cannot train an ensemble (ensemble.seeds={config.ensemble.seeds}, "
                          f"ensemble.folds={config.ensemble.folds}): train it in one process, or add "
                          "ensemble.seeds=[] to train one model with DDP")
    if config.ensemble.seeds:
        return train_seed_ensemble(config, out_dir, manifest=manifest, resume=resume)
    if config.ensemble.folds:
        return train_kfold(config, out_dir, folds=config.ensemble.folds, manifest=manifest, resume=resume)
    return fit(config, out_dir, manifest=manifest, resume=resume)
