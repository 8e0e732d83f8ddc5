"""``covidcxr evaluate``: score a manifest split with a run and write metrics with CIs, predictions, plots.

Output folder (default ``RUN_DIR/eval/<split>/``)::

    metrics.json      every number with its 95 % CI and the method of the CI (schema "covidcxr-eval/1")
    predictions.csv   one row per scored image: manifest columns, class, prob_<class>, predicted, score
    *.png             ROC (bootstrap band + operating point), PR, confusion matrix, score histograms,
                      reliability diagram, and per-group ROC with ``by=...``

The decision threshold is the one stored in ``run.json`` (chosen on validation data by training);
evaluation never re-tunes it. When the manifest holds ``external`` rows (a held-out source) and the
test split is evaluated, the external rows are evaluated too and the internal - external gap is
reported as a headline number.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from covidcxr.data.labels import LABEL_SPACES, LabelSpace, get_label_space
from covidcxr.data.manifest import SPLITS, Manifest
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.evaluation import calibration as cal
from covidcxr.evaluation import plots
from covidcxr.evaluation.classification import binary_metrics, multiclass_metrics
from covidcxr.evaluation.metrics import DEFAULT_LEVEL, DEFAULT_N_BOOT, within_source_auc_details
from covidcxr.evaluation.summary import METRICS_JSON, PREDICTIONS_CSV, format_estimate
from covidcxr.files import jsonable, write_json
from covidcxr.models.run import LoadedRun, load_run
from covidcxr.models.run_split import read_run_split

EVAL_FORMAT = "covidcxr-eval/1"
MANIFEST_COLUMNS = ("image", "patient_id", "source", "label", "finding", "view", "sex", "age", "split")
VAL_WARNING = ("evaluated on the VALIDATION split, which chose the decision threshold (and the checkpoint): "
               "these numbers are optimistic; report test / external results")
#: headline metrics whose internal - external difference is reported
GAP_METRICS = ("auc", "sensitivity", "specificity", "balanced_accuracy")


# ---------------------------------------------------------------- inputs


def run_label_space(run: LoadedRun, override: str | Path | None = None) -> LabelSpace:
    """The label space the run was trained with (``run.json`` info), checked against its classes."""
    recorded = run.record.label_space or run.record.info.get("label_space")
    if isinstance(recorded, dict):
        recorded = recorded.get("path") or recorded.get("name")
    candidates = [override] if override is not None else ([recorded] if recorded else [])
    if not candidates:
        # older runs: find the built-in space with exactly these classes
        candidates = [n for n, f in LABEL_SPACES.items() if list(f().classes) == run.classes]
    if not candidates:
        raise ConfigError(f"{run.run_dir}: run.json records no label space and its classes {run.classes} match no "
                          "built-in one; pass --label-space NAME_OR_YAML")
    try:
        space = get_label_space(candidates[0])
    except ConfigError:
        # a YAML label space is recorded by name; training's config.yaml keeps the file path
        path = _config_label_space(run.run_dir)
        if override is not None or path is None:
            raise ConfigError(f"{run.run_dir}: label space {candidates[0]!r} is not built in and its YAML file is "
                              "unknown; pass --label-space PATH.yaml") from None
        space = get_label_space(path)
    if list(space.classes) != run.classes:
        raise ConfigError(f"label space {space.name!r} has classes {list(space.classes)} but the run predicts "
                          f"{run.classes}; pass the label space the run was trained with")
    return space


def _config_label_space(run_dir: Path) -> str | None:
    import yaml

    cfg = Path(run_dir) / "config.yaml"
    try:
        value = ((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("label_space")
    except (OSError, yaml.YAMLError):
        return None
    return str(value) if value and Path(str(value)).is_file() else None


def _as_manifest(manifest: str | Path | Manifest) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.read(manifest)


def score_manifest(run: LoadedRun, manifest: Manifest, space: LabelSpace, *, batch_size: int = 16,
                   progress: bool = True) -> tuple[pd.DataFrame, list[dict], dict]:
    """Predict every manifest row the label space includes.

    Returns (scored table, skipped files [{image, reason}], excluded-row counts by label).
    """
    from covidcxr.models.predict import predict_paths

    table = manifest.table.reset_index(drop=True)
    cls = space.assign(table)
    keep = cls.notna().to_numpy()
    excluded = table.loc[~keep, "label"].value_counts().to_dict()
    rows = table.loc[keep, [c for c in MANIFEST_COLUMNS if c in table.columns]].copy()
    rows["class"] = cls[keep].to_numpy()
    paths = [str(p) for p, k in zip(manifest.image_paths(), keep) if k]
    rows["path"] = paths
    preds = predict_paths(run, paths, batch_size=batch_size, progress=progress)
    skipped = [{"image": p, "reason": r} for p, r in preds.skipped]
    pred_cols = ["path", *[f"prob_{c}" for c in run.classes], "predicted", "input_sha256"]
    scored = rows.merge(preds.table[pred_cols].drop_duplicates("path"), on="path", how="inner")
    if run.positive_class is not None:
        scored["y_true"] = (scored["class"] == run.positive_class).astype(int)
        scored["score"] = scored[f"prob_{run.positive_class}"].astype(float)
        scored["y_pred"] = (scored["predicted"] == run.positive_class).astype(int)
    return scored, skipped, {str(k): int(v) for k, v in excluded.items()}


def _threshold(run: LoadedRun) -> tuple[float, str]:
    if run.threshold is not None:
        return float(run.threshold), "run.json (chosen on validation data by training)"
    if len(run.classes) == 2:
        return 0.5, "default 0.5: the run stores no validation threshold (argmax decision)"
    raise CovidCXRError(f"{run.run_dir}: run.json has no threshold; threshold metrics need one chosen on validation")


# ---------------------------------------------------------------- metrics of one group


def group_metrics(scored: pd.DataFrame, run: LoadedRun, threshold: float, *, prevalence: float | None = None,
                  clusters: str | None = None, n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL,
                  temperature: cal.TemperatureScaling | None = None, seed: int = 0) -> dict:
    """All metrics of one set of scored images (binary positive-vs-rest plus multi-class where K > 2)."""
    cl = scored[clusters].to_numpy() if clusters else None
    out: dict = {"n_images": int(len(scored)),
                 "n_patients": int(scored["patient_id"].nunique()) if "patient_id" in scored else None,
                 "class_counts": {str(k): int(v) for k, v in scored["class"].value_counts().items()}}
    if len(scored) == 0:
        return out
    probs = scored[[f"prob_{c}" for c in run.classes]].to_numpy(dtype=float)
    if run.positive_class is not None:
        y, s = scored["y_true"].to_numpy(), scored["score"].to_numpy()
        out["binary"] = binary_metrics(y, s, threshold, level=level, clusters=cl, n_boot=n_boot, seed=seed,
                                       prevalence=prevalence)
        out["binary"]["positive_class"] = run.positive_class
        out["within_source_auc"] = within_source_auc_details(y, s, scored["source"].to_numpy(), level=level)
        out["calibration"] = _calibration(y, s, probs, run, temperature)
    if len(run.classes) > 2:
        out["multiclass"] = multiclass_metrics(scored["class"], probs, run.classes, y_pred=scored["predicted"],
                                               level=level, clusters=cl, n_boot=n_boot, seed=seed)
    return out


def _calibration(y, s, probs, run: LoadedRun, temperature: cal.TemperatureScaling | None) -> dict:
    out = {"ece": cal.expected_calibration_error(y, s), "brier": cal.brier_score(y, s),
           "reliability": cal.reliability_curve(y, s), "bins": cal.DEFAULT_BINS}
    if temperature is not None:
        sp = temperature.transform(probs)[:, run.positive_index]
        out["temperature_scaled"] = {"temperature": temperature.temperature, "fitted_on": temperature.fitted_on,
                                     "ece": cal.expected_calibration_error(y, sp), "brier": cal.brier_score(y, sp),
                                     "reliability": cal.reliability_curve(y, sp)}
    return out


def by_group_metrics(scored: pd.DataFrame, column: str, run: LoadedRun, threshold: float, **kwargs) -> dict:
    if column not in scored.columns:
        raise ConfigError(f"--by {column}: the manifest has no column {column!r}; use e.g. source, view, sex")
    keys = scored[column].fillna("").astype(str).replace("", "(missing)")
    return {str(k): group_metrics(scored[keys == k], run, threshold, **kwargs) for k in sorted(keys.unique())}


def internal_external_gap(internal: dict, external: dict) -> dict:
    """internal - external for the headline metrics (positive = the model is worse on external data)."""
    gap = {}
    for name in GAP_METRICS:
        a = (internal.get("binary") or {}).get(name, {}).get("value")
        b = (external.get("binary") or {}).get(name, {}).get("value")
        gap[name] = None if a is None or b is None else float(a - b)
    return gap


# ---------------------------------------------------------------- temperature scaling


def fit_or_load_temperature(run: LoadedRun, manifest: Manifest, space: LabelSpace, *, batch_size: int,
                            progress: bool) -> cal.TemperatureScaling:
    """The run's stored temperature, or one fitted now on the manifest's VALIDATION rows and stored."""
    stored = cal.TemperatureScaling.from_record(run.record.calibration)
    if stored is not None:
        return stored
    val = manifest.subset("val")
    if len(val) == 0:
        raise CovidCXRError(f"{manifest.name}: no 'val' rows to fit temperature scaling on; it is never fitted on test")
    scored, _, _ = score_manifest(run, val, space, batch_size=batch_size, progress=progress)
    index = {c: i for i, c in enumerate(run.classes)}
    temp = cal.TemperatureScaling.fit(scored[[f"prob_{c}" for c in run.classes]].to_numpy(),
                                      scored["class"].map(index).to_numpy(), fitted_on="val")
    from covidcxr.models.record import update_run_record

    update_run_record(run.run_dir, calibration=temp.to_record())
    return temp


# ---------------------------------------------------------------- the command


def evaluate_run(run_dir: str | Path, manifest: str | Path | Manifest | None = None, *, split: str = "test",
                 by: str | None = None, prevalence: float | None = None, out: str | Path | None = None,
                 readers: str | Path | None = None, patient_bootstrap: bool = False,
                 temperature_scaling: bool = False, label_space: str | Path | None = None,
                 n_boot: int = DEFAULT_N_BOOT, level: float = DEFAULT_LEVEL, batch_size: int = 16,
                 progress: bool = True, make_plots: bool = True, run: LoadedRun | None = None) -> dict:
    """Evaluate ``run_dir`` on the ``split`` rows of ``manifest`` (default: the run's own split.csv);
    write metrics.json, predictions.csv, plots."""
    run = run if run is not None else load_run(run_dir)
    manifest = _as_manifest(manifest) if manifest is not None else read_run_split(run.run_dir, run.record)
    space = run_label_space(run, label_space)
    out = Path(out) if out is not None else Path(run_dir) / "eval" / split
    groups = [split]
    if split == "test" and (manifest.table["split"] == "external").any():
        groups.append("external")
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: use one of {list(SPLITS)}")
    missing = [g for g in groups if not (manifest.table["split"] == g).any()]
    if missing:
        counts = manifest.table["split"].replace("", "(empty)").value_counts().to_dict()
        raise CovidCXRError(f"{manifest.name}: no rows in split {missing[0]!r} (splits present: {counts}); "
                            "split the manifest first with `covidcxr data split`")
    threshold, threshold_source = _threshold(run)
    temperature = (fit_or_load_temperature(run, manifest, space, batch_size=batch_size, progress=progress)
                   if temperature_scaling else None)
    scored, skipped, excluded = score_manifest(run, manifest.subset(groups), space, batch_size=batch_size,
                                               progress=progress)
    opts = dict(prevalence=prevalence, clusters="patient_id" if patient_bootstrap else None, n_boot=n_boot,
                level=level, temperature=temperature)
    result: dict = {
        "format": EVAL_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(Path(run_dir).resolve()),
        "model_sha256": run.model_sha256,
        "manifest": manifest.name,
        "split": split,
        "label_space": space.name,
        "classes": run.classes,
        "positive_class": run.positive_class,
        "threshold": threshold,
        "threshold_source": threshold_source,
        "confidence_level": level,
        "ci_unit": "patient (cluster bootstrap)" if patient_bootstrap else "image",
        "n_boot": n_boot,
        "skipped": skipped,
        "excluded_by_label_space": excluded,
        "groups": {},
    }
    if split == "val":
        result["warning"] = VAL_WARNING
    for g in groups:
        part = scored[scored["split"] == g]
        result["groups"][g] = group_metrics(part, run, threshold, **opts)
        if by:
            result["groups"][g]["by"] = {"column": by, "groups": by_group_metrics(part, by, run, threshold, **opts)}
    if "external" in result["groups"] and split != "external":
        result["internal_vs_external"] = {"internal": split, "external": "external",
                                          "gap": internal_external_gap(result["groups"][split],
                                                                       result["groups"]["external"])}
    if readers is not None:
        result["readers"] = _readers(scored[scored["split"] == split], readers, run, space)
    out.mkdir(parents=True, exist_ok=True)
    scored.drop(columns=["path"]).to_csv(out / PREDICTIONS_CSV, index=False)
    result["plots"] = write_plots(out, scored, run, threshold, result, by=by) if make_plots else {}
    result = jsonable(result)
    write_json(out / METRICS_JSON, result)
    result["out"] = str(out)
    return result


def _readers(scored: pd.DataFrame, reads_path, run: LoadedRun, space: LabelSpace) -> dict:
    from covidcxr.evaluation.compare import compare_readers, read_reader_calls

    if run.positive_class is None:
        raise CovidCXRError("reader comparison needs a run with a positive class")
    reads = read_reader_calls(reads_path)
    # readers may answer in manifest labels (normal / pneumonia / covid): map them like the manifest rows
    labels = sorted({"covid", "normal", "pneumonia", "other"} | set(scored["label"].astype(str)))
    label_to_class = dict(zip(labels, space.assign(pd.DataFrame({"label": labels, "finding": [""] * len(labels)}))))
    return compare_readers(scored, reads, positive_class=run.positive_class, classes=run.classes,
                           name=str(reads_path), label_to_class=label_to_class)


def write_plots(out: Path, scored: pd.DataFrame, run: LoadedRun, threshold: float, result: dict, *,
                by: str | None = None) -> dict:
    """All PNG figures per evaluated group; returns {group: {figure: file name}}."""
    written: dict = {}
    for g, metrics in result["groups"].items():
        part = scored[scored["split"] == g]
        figs: dict = {}
        if len(part) == 0:
            continue
        if "binary" in metrics:
            y, s = part["y_true"].to_numpy(), part["score"].to_numpy()
            b = metrics["binary"]
            if 0 < y.sum() < len(y):
                text = f"AUC {format_estimate(b['auc'])}"
                figs["roc"] = plots.plot_roc(out / f"roc_{g}.png", y, s, threshold=threshold, auc_text=text,
                                             title=f"ROC, {run.positive_class} vs rest ({g})").name
                figs["pr"] = plots.plot_pr(out / f"pr_{g}.png", y, s, threshold=threshold,
                                           title=f"Precision-recall ({g})").name
            figs["histogram"] = plots.plot_score_histograms(out / f"scores_{g}.png", s, part["class"],
                                                            threshold=threshold, title=f"p({run.positive_class}) per true class ({g})").name
            c = metrics["calibration"]
            figs["reliability"] = plots.plot_reliability(out / f"reliability_{g}.png", c["reliability"], ece=c["ece"],
                                                         calibrated=(c.get("temperature_scaled") or {}).get("reliability"),
                                                         title=f"Reliability ({g})").name
            cm = b["confusion"]
            labels = [f"not {run.positive_class}", run.positive_class]
            figs["confusion"] = plots.plot_confusion(out / f"confusion_{g}.png", [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]],
                                                     labels, title=f"At threshold {threshold:.3g} ({g})").name
            if by:
                figs["roc_by"] = plots.plot_roc_by_group(out / f"roc_by_{by}_{g}.png", y, s, part[by].fillna("").astype(str),
                                                         title=f"ROC per {by} ({g})").name
        if "multiclass" in metrics:
            cm = metrics["multiclass"]["confusion_matrix"]
            figs["confusion_multiclass"] = plots.plot_confusion(out / f"confusion_multiclass_{g}.png", cm["matrix"],
                                                                cm["labels"], title=f"Confusion matrix ({g})").name
        written[g] = figs
    return written


def read_eval_results(run_dir: str | Path) -> dict[str, dict]:
    """Every ``RUN_DIR/eval/*/metrics.json`` keyed by its folder name (for reports)."""
    found = {}
    for path in sorted(Path(run_dir).glob("eval/*/" + METRICS_JSON)):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CovidCXRError(f"{path}: not valid JSON ({exc}); re-run `covidcxr evaluate`") from exc
        data["_dir"] = str(path.parent)
        found[path.parent.name] = data
    return found
