"""``covidcxr audit shortcuts RUN --manifest M``: one scorecard of how much a model leans on shortcuts.

Each check has a measured value with a 95% CI (:mod:`covidcxr.audit.shortcut_checks`), a verdict
from :data:`THRESHOLDS` and one sentence. A threshold pair ``(warn, fail)`` reads "worse than warn
warns, worse than fail fails"; ``worse`` is ``above`` or ``below``. The defaults (docs/audits.md) are
judgement calls, not standards; override any of them, e.g. ``--threshold lungs_removed_auc=0.6,0.7``.

The card goes into ``run.json`` (``audits.shortcuts``, through the record's one writer), into
``OUT/shortcuts.json`` and to the top of the HTML report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from covidcxr.errors import ConfigError
from covidcxr.files import jsonable, write_json


@dataclass(frozen=True)
class Threshold:
    warn: float
    fail: float
    worse: str  # "above" or "below"
    sentence: str  # what the value means; {value} is filled in

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        bad = (lambda v, t: v >= t) if self.worse == "above" else (lambda v, t: v <= t)
        return "fail" if bad(value, self.fail) else "warn" if bad(value, self.warn) else "pass"


THRESHOLDS: dict[str, Threshold] = {
    "source_probe_excess": Threshold(0.05, 0.15, "above", "The model's features tell the sources apart {value:+.2f} "
                                     "(balanced accuracy) better than the ImageNet features it started from."),
    "lungs_removed_auc": Threshold(0.65, 0.75, "above", "With the lungs blacked out the model still separates the "
                                   "classes with AUC {value:.2f}; 0.5 would mean it needs the lungs."),
    "lungs_only_auc": Threshold(0.70, 0.60, "below", "On the lungs alone the AUC is {value:.2f}; a model reading the "
                                "disease keeps most of its AUC here."),
    "border_only_auc": Threshold(0.65, 0.75, "above", "From the outer border frame alone (no anatomy) the AUC is "
                                 "{value:.2f}; 0.5 would mean the border carries nothing it uses."),
    "heatmap_lung_mass_excess": Threshold(0.10, 0.0, "below", "Grad-CAM puts {value:+.2f} more of its mass in the lungs "
                                          "than a uniform map would."),
    "pointing_game": Threshold(0.70, 0.50, "below", "The heatmap's peak falls in the lungs for {value:.0%} of the "
                               "annotated positive images."),
    "marker_delta_p": Threshold(0.05, 0.10, "above", "Pasting a text / laterality marker or a thin border on negatives "
                                "moves P(positive) by {value:.3f} on average (worst marker)."),
    "marker_flips": Threshold(0.05, 0.10, "above", "The worst marker flips {value:.0%} of the negatives' decisions."),
    "perturbation_delta_p": Threshold(0.05, 0.10, "above", "Resolution, JPEG quality or gamma changes move P(positive) "
                                      "by {value:.3f} on average (worst change)."),
    "perturbation_delta_auc": Threshold(0.03, 0.06, "above", "The worst of those changes moves the AUC by {value:.3f}."),
    "subgroup_auc_gap": Threshold(0.10, 0.20, "above", "The AUC differs by {value:.2f} between the best and the worst "
                                  "age band / sex."),
    "age_only_auc": Threshold(0.70, 0.80, "above", "Age alone separates the classes of these images with AUC "
                              "{value:.2f}: a shortcut open to any model (a property of the data)."),
}


def parse_overrides(items: list[str]) -> dict[str, Threshold]:
    """``name=warn,fail`` strings -> the thresholds with those replaced (unknown names are errors)."""
    out = dict(THRESHOLDS)
    for item in items:
        name, _, values = item.partition("=")
        if name not in THRESHOLDS:
            raise ConfigError(f"--threshold {item!r}: no check {name!r}; checks: {', '.join(THRESHOLDS)}")
        try:
            warn, fail = (float(v) for v in values.split(","))
        except ValueError:
            raise ConfigError(f"--threshold {item!r}: give two numbers, warn,fail") from None
        out[name] = Threshold(warn, fail, THRESHOLDS[name].worse, THRESHOLDS[name].sentence)
    return out


def _worst(entries: dict, key: str) -> tuple[str | None, dict | None]:
    best = None
    for name, e in entries.items():
        v = e.get(key) if isinstance(e, dict) else None
        v = v.get("value") if isinstance(v, dict) else v
        if v is not None and (best is None or abs(v) > abs(best[1])):
            best = (name, v)
    if best is None:
        return None, None
    e = entries[best[0]][key]
    return best[0], e if isinstance(e, dict) else {"value": abs(best[1])}


def build_checks(m: dict, thresholds: dict[str, Threshold]) -> list[dict]:
    """The card's rows from the measurements ``m`` of :func:`audit_shortcuts`."""
    sp, lungs, hm = m["source_probe"], m["lungs"], m["heatmaps"]
    marker_p = _worst(m["markers"], "mean_abs_delta_p")
    marker_f = _worst(m["markers"], "flipped")
    perturb = {k: v for k, v in m["perturbation"].items() if k != "original_auc"}
    pert_p = _worst(perturb, "mean_abs_delta_p")
    pert_auc = max(((k, v["delta_auc"]) for k, v in perturb.items() if v.get("delta_auc") is not None),
                   key=lambda kv: abs(kv[1]), default=(None, None))
    sg = m["subgroups"]
    rows = [
        ("source_probe_excess", {"value": sp.get("excess_over_imagenet"), "ci_low": _shift(sp, "ci_low"),
                                 "ci_high": _shift(sp, "ci_high")},
         f"probe balanced accuracy {_f(sp.get('value'))} (chance {_f(sp.get('chance'))}), ImageNet features "
         f"{_f((sp.get('imagenet') or {}).get('value'))}"),
        ("lungs_removed_auc", lungs.get("no_lungs"), "segmented lungs (+3%) blacked out"),
        ("lungs_only_auc", lungs.get("lungs_only"), "everything but the segmented lungs (+3%) blacked out"),
        ("border_only_auc", lungs.get("border_only"), "only the outer 12% frame kept"),
        ("heatmap_lung_mass_excess", hm.get("mass_share_over_uniform"), "Grad-CAM on annotated positives"),
        ("pointing_game", hm.get("pointing_game"), "Grad-CAM peak inside the annotated lungs"),
        ("marker_delta_p", marker_p[1], f"worst: {marker_p[0]}"),
        ("marker_flips", marker_f[1], f"worst: {marker_f[0]}"),
        ("perturbation_delta_p", pert_p[1], f"worst: {pert_p[0]}"),
        ("perturbation_delta_auc", {"value": abs(pert_auc[1]) if pert_auc[1] is not None else None}, f"worst: {pert_auc[0]}"),
        ("subgroup_auc_gap", sg.get("max_gap"), f"{(sg.get('max_gap') or {}).get('groups', 0)} groups"),
        ("age_only_auc", sg.get("age_only_auc"), "AUC of age as the only score"),
    ]
    out = []
    for name, est, detail in rows:
        est = est or {}
        t = thresholds[name]
        value = est.get("value")
        verdict = t.verdict(value)
        out.append({"name": name, "value": value, "ci_low": est.get("ci_low"), "ci_high": est.get("ci_high"),
                    "verdict": verdict, "sentence": t.sentence.format(value=value) if value is not None
                    else est.get("note", "Not measurable on these images."), "detail": detail,
                    "thresholds": {"warn": t.warn, "fail": t.fail, "worse": t.worse}})
    return out


def _shift(sp: dict, key: str):
    ref = (sp.get("imagenet") or {}).get("value")
    return None if ref is None or sp.get(key) is None else sp[key] - ref


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def audit_shortcuts(run_dir: str | Path, manifest: str | Path | None = None, *, out: str | Path | None = None,
                    split: str = "test", thresholds: dict[str, Threshold] | None = None, work_dir: str | Path | None = None,
                    annotations_folder: str | Path | None = None, limit_per_source: int | None = None,
                    per_source: int = 15, heatmap_images: int = 24, n_boot: int = 300, seed: int = 0,
                    write_record: bool = True) -> dict:
    """Measure every check on ``split`` rows (of ``manifest``, else the run's own split.csv) and judge it."""
    from covidcxr import paths as cpaths
    from covidcxr.audit import shortcut_checks as sc
    from covidcxr.audit.backdoor import manifest_rows, stratified_sample
    from covidcxr.evaluation.proxies import predict_files, split_rows
    from covidcxr.models.record import update_run_record
    from covidcxr.models.run import load_run

    t0 = time.perf_counter()
    thresholds = thresholds or THRESHOLDS
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if manifest is not None:
        rows = manifest_rows(run, manifest, split, None, seed)
        rows["y"] = (rows["y"] == run.positive_index).astype(int)
    else:
        rows = split_rows(run, split)
    if limit_per_source:
        rows = stratified_sample(rows, ["source", "y"], lambda n: limit_per_source, seed)
    work = Path(work_dir) if work_dir is not None else cpaths.cache_dir() / "proxies"
    annotations_folder = Path(annotations_folder) if annotations_folder is not None else cpaths.data_root() / "annotations"
    base, feats = predict_files(run, rows["path"], features=True)
    scores = base["score"].to_numpy()
    m = {"source_probe": sc.source_probe_check(run, rows, feats, n_boot=n_boot, seed=seed),
         "lungs": sc.lung_checks(run, rows, scores, work, annotations_folder),
         "heatmaps": sc.heatmap_checks(run_dir, rows, work, annotations_folder, heatmap_images, seed, n_boot),
         "markers": sc.marker_checks(run, rows, work, per_source, n_boot, seed),
         "perturbation": sc.perturbation_checks(run, rows, work, per_source, n_boot, seed),
         "subgroups": sc.subgroup_checks(rows, scores)}
    checks = build_checks(m, thresholds)
    worst = "fail" if any(c["verdict"] == "fail" for c in checks) else \
        "warn" if any(c["verdict"] == "warn" for c in checks) else "pass"
    named = [c["name"] for c in checks if c["verdict"] == worst] if worst != "pass" else []
    card = {"verdict": worst, "sentence": (f"{len(named)} check(s) {worst}: {', '.join(named)}." if named else
                                           "Every check passed its threshold on these images."),
            "checks": checks, "split": split, "images": int(len(rows)), "manifest": str(manifest) if manifest else None,
            "model_sha256": run.model_sha256, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(out) if out is not None else run_dir / "audit"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "shortcuts.json", {**card, "measurements": m})
    if write_record:
        update_run_record(run_dir, audits={**run.record.audits, "shortcuts": jsonable(card)})
    return {**card, "measurements": m}
