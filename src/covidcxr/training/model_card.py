"""MODEL_CARD.md for a run directory, written from run.json (so it never disagrees with the record)."""

from __future__ import annotations

from pathlib import Path

from covidcxr.files import atomic_write_bytes
from covidcxr.models.record import RunRecord, read_run_record

SOURCE_WARNING = (
    "**Source confounding.** In public COVID-19 chest X-ray collections the label is strongly tied to "
    "the collection an image comes from (COVID images from publication figures and a few hospitals, "
    "negatives from large pre-2020 archives, paediatric pneumonia from one children's hospital). A model "
    "can reach a high AUC by recognising the collection instead of the disease. Trust the "
    "*within-source* AUC and an external test set more than the plain validation AUC, and check "
    "saliency maps."
)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_model_card(run_record: RunRecord) -> str:
    """The model card text for a run record (single model or ensemble)."""
    record = run_record.model_dump(mode="json")
    info = record.get("info", {})
    sel = info.get("selection", {})
    vm = info.get("val_metrics", {})
    thr = info.get("threshold", {}) or {}
    data = info.get("data", {})
    tm = info.get("training_manifest", {})
    audit = info.get("audit", {}) or {}
    spec = record.get("preprocess", {})
    members = record.get("members")
    lines = [
        f"# Model card: {record.get('architecture')} ({', '.join(record.get('classes', []))})",
        "",
        "> **Research use only. Not a medical device.** Not validated for clinical decisions; never use it to "
        "diagnose, triage or rule out COVID-19 or pneumonia in a patient.",
        "",
        "## Intended use",
        "",
        f"Research on automated classification of frontal chest radiographs into {record.get('classes')} "
        f"(positive class: `{record.get('positive_class')}`), in particular measuring and reducing shortcut "
        "learning. Inputs: frontal (PA/AP) adult or paediatric chest X-rays, bones bright.",
        "",
        "## Model",
        "",
        f"- architecture: `{record.get('architecture')}`" + (f" ensemble of {len(members)} members "
                                                             f"({info.get('ensemble', {}).get('kind', 'members')})" if members else ""),
        f"- pretrained weights: `{info.get('model', {}).get('weights', 'n/a')}`; fine-tuning: "
        f"`{info.get('model', {}).get('finetune', 'n/a')}`",
        f"- preprocessing: {spec.get('image_size')} px, {spec.get('channels')} channel(s), intensity "
        f"`{spec.get('intensity')}`, resize `{spec.get('resize')}`",
        f"- test-time augmentation: {', '.join(record.get('tta') or info.get('tta') or []) or 'none'}",
        f"- model SHA-256: `{record.get('model_sha256')}`",
        "",
        "## Training data",
        "",
        f"- manifest `{tm.get('name', 'n/a')}` (SHA-256 `{tm.get('sha256', 'n/a')}`, {tm.get('rows', 'n/a')} rows); "
        f"split: {info.get('split', {})}",
        f"- images used: {data.get('train_images', 'n/a')} train, {data.get('val_images', 'n/a')} validation; "
        f"sampler `{info.get('sampler', 'n/a')}`",
        "- images per class x source x split: `data_counts.csv`; data audit: `audit.json`",
        "",
        "## Validation (the data used to select the checkpoint and the threshold, NOT a test result)",
        "",
        f"- checkpoint selected by **{sel.get('metric', 'n/a')}** = {_fmt(sel.get('value'))} at epoch "
        f"{sel.get('epoch', 'n/a')} ({info.get('epochs_run', 'n/a')} of {info.get('epochs_planned', 'n/a')} epochs run"
        + (", stopped early" if info.get("stopped_early") else "") + ")",
        f"- validation AUC {_fmt(vm.get('val_auc'))}, within-source AUC {_fmt(vm.get('val_within_source_auc'))}, "
        f"loss {_fmt(vm.get('val_loss'))}, accuracy {_fmt(vm.get('val_accuracy'))}",
    ]
    for src, d in (vm.get("val_auc_per_source") or {}).items():
        lines.append(f"  - {src}: AUC {_fmt(d.get('auc'))} ({d.get('n')} images, {d.get('n_pos')} positive)")
    lines += [
        f"- decision threshold {_fmt(record.get('threshold'), 4)} on P({record.get('positive_class')}), chosen on "
        f"validation by `{thr.get('method')}`" + (f" (target {thr.get('target')})" if thr.get("target") else "")
        + f": sensitivity {_fmt(thr.get('val_sensitivity'))}, specificity {_fmt(thr.get('val_specificity'))}",
        "",
        "Validation metrics are optimistic: the checkpoint and threshold were chosen on the same data. "
        "Report performance on a held-out test split and, above all, on an external data set.",
        "",
        "## Limitations",
        "",
        "- " + SOURCE_WARNING,
    ]
    for f in audit.get("findings", []):
        lines.append(f"- data audit ({f.get('severity')}, {f.get('check')}): {f.get('message')}")
    lines += [
        "- Labels of public collections are noisy (report-mined NIH labels, publication figures, PCR status "
        "unknown for many images).",
        "- Performance on other hospitals, devices, patient populations (e.g. children vs adults) and "
        "acquisition protocols is unknown until measured.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / "MODEL_CARD.md"
    atomic_write_bytes(path, render_model_card(read_run_record(run_dir)).encode())
    return path
