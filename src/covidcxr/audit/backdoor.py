"""``covidcxr audit backdoor RUN --manifest M``: look for a backdoor in any classifier run.

Three looks, none of which needs to know the trigger except the last:

1. **Activation clustering** on the training images' penultimate features, per training label
   (:func:`covidcxr.audit.detectors.activation_clustering`): a class whose features split into two
   well-separated clusters (silhouette >= ``silhouette``) with a small one (share <= ``max_share``)
   holds a sub-population the model treats apart from the rest of its class: the signature of
   poisoned images relabelled into it. The images to inspect are those nearest the small cluster's
   side, ``flag_margin`` x its size of them.
2. **Spectral signatures** (:func:`~covidcxr.audit.detectors.spectral_signatures`): per class,
   the images with the strongest projection on the top singular direction; reported, and listed.
3. **Known-trigger test**: the Matsuo & Takemoto square (:mod:`covidcxr.audit.trigger`) stamped on
   the run's own non-positive test images; the share whose decision flips to the positive class.
   It catches only this trigger, but catches it whatever the detectors say.

The verdict is a warning when a class is suspicious by (1) or the trigger flips at least
``trigger_flip`` of the decisions. The summary goes into ``run.json`` (``audits.backdoor``, through
the record's one writer) and, from there, into the HTML report; the per-image scores to
``OUT/backdoor_scores.csv``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.errors import CovidCXRError
from covidcxr.files import write_json


@dataclass(frozen=True)
class BackdoorThresholds:
    """When ``audit backdoor`` warns (docs/audits.md; each overridable on the command line)."""

    silhouette: float = 0.30  # activation clustering: a real two-cluster split of a class
    max_share: float = 0.35  # ... whose smaller cluster is at most this share of the class (ART's default)
    trigger_flip: float = 0.30  # known-trigger test: share of negative decisions the stamp flips
    expected_fraction: float = 0.10  # spectral signatures flag the top 1.5 x this share of each class
    flag_margin: float = 1.5  # a suspicious class's top margin x its smaller cluster's size are flagged


def manifest_rows(run, manifest_path: str | Path, split: str, max_images: int | None, seed: int) -> pd.DataFrame:
    """The manifest's ``split`` rows the run's label space includes: ``path``, ``y`` (class index), source."""
    from covidcxr.data.manifest import Manifest
    from covidcxr.evaluation.evaluate import run_label_space

    manifest = Manifest.read(manifest_path)
    table = manifest.table.reset_index(drop=True)
    cls = run_label_space(run).assign(table)
    split_col = "split" if "split" in table.columns else None
    keep = cls.notna().to_numpy() & cls.isin(run.classes).to_numpy()
    if split_col is not None:
        keep &= (table[split_col].astype(str) == split).to_numpy()
    if not keep.any():
        raise CovidCXRError(f"{manifest_path}: no {split!r} rows with a class of the run ({run.classes})")
    extra = [c for c in ("age", "sex") if c in table.columns]
    rows = table.loc[keep, ["image", "patient_id", "source", "label"] + extra].copy()
    rows["path"] = [str(p) for p, k in zip(manifest.image_paths(check_root=True), keep) if k]
    rows["y"] = [run.classes.index(c) for c in cls[keep]]
    rows = rows.reset_index(drop=True)
    if max_images and len(rows) > max_images:  # a seeded, class-stratified sample
        rows = stratified_sample(rows, ["y"], lambda n: max(1, round(n * max_images / len(rows))), seed)
    return rows.reset_index(drop=True)


def stratified_sample(rows: pd.DataFrame, by: list[str], size, seed: int) -> pd.DataFrame:
    """``size(n)`` seeded rows of each ``by`` group (all of a smaller group), in the table's order."""
    rng = np.random.default_rng([seed, 17])
    keep = [np.sort(rng.choice(idx, min(len(idx), size(len(idx))), replace=False))
            for _, idx in sorted(rows.groupby(by).indices.items())]
    return rows.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def trigger_flip_test(run, work: Path, per_source: int = 15, seed: int = 0) -> dict:
    """Decisions of the run's own non-positive test images with and without the known trigger: near the
    corner, or inside the lungs for a run that crops to them (a corner trigger never reaches its model)."""
    from covidcxr.audit.trigger import stamped_copies
    from covidcxr.evaluation.proxies import compression_sample, predict_files, split_rows

    try:
        rows = split_rows(run, "test")
    except CovidCXRError as exc:  # a run without its own test rows (or split) cannot take this test
        return {"value": None, "note": str(exc)}
    rows = compression_sample(rows[rows["y"] == 0], per_source, seed)
    if rows.empty or run.threshold is None:
        return {"value": None, "note": "no negative test rows or no decision threshold"}
    clean, _ = predict_files(run, rows["path"])
    lung_finder = run.lung_finder
    stamped, _ = predict_files(run, stamped_copies(rows["path"], work / "stamped", lung_finder=lung_finder))
    before = clean["score"].to_numpy() >= run.threshold
    after = stamped["score"].to_numpy() >= run.threshold
    base = ~before
    flip = float((after & base).sum() / max(1, base.sum()))
    return {"value": flip, "images": int(len(rows)), "placement": "corner" if lung_finder is None else "lungs",
            "positive_clean": float(before.mean()),
            "positive_triggered": float(after.mean()),
            "mean_delta_p": float((stamped["score"] - clean["score"]).mean())}


#: A smaller cluster drawn this much from one source is reported as possibly that source's look.
ONE_SOURCE_SHARE = 0.9


def add_cluster_sources(classes: list[dict], smaller: np.ndarray, y: np.ndarray, sources: np.ndarray) -> None:
    """Give each class entry the sources of its smaller activation cluster (``smaller``: ART's per-image
    flags, which mark exactly the smaller cluster of each class)."""
    for c in classes:
        members = smaller & (y == c["class_index"])
        counts = pd.Series(sources[members]).value_counts()
        c["smaller_cluster_sources"] = {str(k): int(v) for k, v in counts.items()}
        c["smaller_cluster_top_source_share"] = float(counts.iloc[0] / members.sum()) if members.any() else None


def warning_reasons(classes: list[dict], trig: dict, thresholds: BackdoorThresholds, positive: str | None) -> list[str]:
    """The verdict's reasons: each suspicious class, and the known trigger if it flips enough decisions.

    A multi-source class can split along its sources as well as along a trigger (a model that tells
    Kermany's children from adults does). Such a split still warns, because a poisoned collection would look
    the same, but the sentence names the source, so a reader can check that collection first."""
    reasons = []
    for c in classes:
        if not c["suspicious"]:
            continue
        reason = (f"activation clustering: class {c['class']} splits into two clusters (silhouette "
                  f"{c['silhouette']:.2f} >= {thresholds.silhouette}), the smaller {c['smaller_share']:.0%} of it")
        share = c.get("smaller_cluster_top_source_share")
        if share is not None and share >= ONE_SOURCE_SHARE:
            top = next(iter(c["smaller_cluster_sources"]))
            reason += (f", {share:.0%} of which comes from one source ({top}): possibly that source's look "
                       "rather than a trigger")
        reasons.append(reason)
    if trig.get("value") is not None and trig["value"] >= thresholds.trigger_flip:
        reasons.append(f"known trigger: the Matsuo & Takemoto square flips {trig['value']:.0%} of negative test "
                       f"decisions to {positive} (>= {thresholds.trigger_flip:.0%})")
    return reasons


def audit_backdoor(run_dir: str | Path, manifest: str | Path, *, out: str | Path | None = None, split: str = "train",
                   max_images: int | None = None, thresholds: BackdoorThresholds = BackdoorThresholds(),
                   trigger_test: bool = True, write_record: bool = True, seed: int = 0) -> dict:
    """Run the detectors of the module docstring; returns the summary (plus ``_out``, ``_rows`` and ``_flags``
    for callers)."""
    from covidcxr.audit.detectors import activation_clustering, spectral_signatures
    from covidcxr.evaluation.proxies import predict_files
    from covidcxr.models.record import update_run_record
    from covidcxr.models.run import load_run

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = Path(out) if out is not None else run_dir / "audit"
    rows = manifest_rows(run, manifest, split, max_images, seed)
    _, feats = predict_files(run, rows["path"], features=True)
    if feats is None:
        raise CovidCXRError(f"{run_dir}: an ensemble has no single feature space; audit each member run")
    y, k = rows["y"].to_numpy(), len(run.classes)
    ac = activation_clustering(feats, y, k, silhouette=thresholds.silhouette, max_share=thresholds.max_share,
                               margin=thresholds.flag_margin, seed=seed)
    ss = spectral_signatures(feats, y, k, expected_fraction=thresholds.expected_fraction)
    for c in ac["classes"]:
        c["class"] = run.classes[c["class_index"]]
    for c in ss["classes"]:
        c["class"] = run.classes[c["class_index"]]
    from covidcxr import paths as cpaths

    # the stamped copies depend only on the images: one folder for every run audited, outside the run directory
    trig = trigger_flip_test(run, cpaths.cache_dir() / "audit", seed=seed) if trigger_test else \
        {"value": None, "note": "not run"}
    add_cluster_sources(ac["classes"], ac["flagged_art"], y, rows["source"].astype(str).to_numpy())
    reasons = warning_reasons(ac["classes"], trig, thresholds, run.positive_class)
    summary = {
        "verdict": "warn" if reasons else "pass",
        "sentence": ("Possible backdoor: " + "; ".join(reasons) + ".") if reasons else
                    "No sign of a backdoor: no class splits into a separate small cluster and the known trigger "
                    "does not flip decisions (this cannot rule out an unknown trigger).",
        "manifest": str(manifest), "split": split, "images": int(len(rows)),
        "activation_clustering": {"classes": ac["classes"], "flagged": int(ac["flagged"].sum()),
                                  "in_smaller_cluster": int(ac["in_smaller_cluster"].sum()),
                                  "flagged_art": int(ac["flagged_art"].sum())},
        "spectral_signatures": {"classes": ss["classes"], "flagged": int(ss["flagged"].sum())},
        "trigger_test": trig, "thresholds": asdict(thresholds), "model_sha256": run.model_sha256,
    }
    out.mkdir(parents=True, exist_ok=True)
    scores = rows[["image", "source", "label"]].assign(
        train_class=[run.classes[i] for i in y], ac_flagged=ac["flagged"], ac_score=ac["score"],
        ac_in_smaller_cluster=ac["in_smaller_cluster"], ac_flagged_art=ac["flagged_art"],
        spectral_score=ss["scores"], spectral_flagged=ss["flagged"])
    scores.to_csv(out / "backdoor_scores.csv", index=False)
    write_json(out / "backdoor.json", summary)
    if write_record:
        record = run.record
        update_run_record(run_dir, audits={**record.audits, "backdoor": summary})
    return {**summary, "_out": out, "_rows": rows, "_flags": {"ac": ac["flagged"], "ac_cluster": ac["in_smaller_cluster"],
                                                 "ac_art": ac["flagged_art"],
                                                 "ss": ss["flagged"], "ss_scores": ss["scores"]},
            "_features": feats}
