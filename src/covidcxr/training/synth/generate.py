"""``covidcxr synth generate``: translate manifest images with a CycleGAN generator into a synthetic manifest.

Every generated image is an 8-bit PNG (the source image's aspect ratio, longer side = the run's image
size) and one manifest row flagged ``synthetic=true`` with its provenance (:mod:`covidcxr.data.synthetic`):
the generator's SHA-256, the source image and the source patient, whose ``patient_id`` it keeps, so
that it can only ever join its patient in ``train``. Its label is the target domain's when the target
domain's filter names one label (normal -> covid makes ``covid`` rows), else the source image's (a
source -> source translation keeps the label). Source rows in val / test / external are refused:
synthetic images are training-only, and one made from a held-out image would leak it.

Out folder: ``images/*.png``, ``manifest.csv`` (the synthetic rows), ``skipped.csv`` (unreadable sources
and why) and ``generation.json`` (run, generator, counts).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from covidcxr.data.io import read_xray
from covidcxr.data.manifest import Manifest
from covidcxr.data.synthetic import ALLOWED_SPLITS, synthetic_mask
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import atomic_write_bytes, write_csv, write_json
from covidcxr.models.cyclegan import load_generator
from covidcxr.progress import make_progress

COPIED_COLUMNS = ("patient_id", "source", "view", "sex", "age", "offset_days", "split")


def parse_filters(items: list[str]) -> dict[str, list[str]]:
    """``["label=normal", "split=train", "source=a", "source=b"]`` -> ``{"label": ["normal"], ...}`` (repeats: any of)."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--filter {item!r}: expected column=value, e.g. label=normal")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _portable(path: Path) -> str:
    """A source image's path relative to the data root when it lies inside it (portable), else absolute."""
    from covidcxr.paths import data_root

    real = Path(path).resolve()
    return real.relative_to(data_root()).as_posix() if real.is_relative_to(data_root()) else real.as_posix()


def _target_label(domain: dict) -> str | None:
    value = domain.get("filter", {}).get("label")
    values = value if isinstance(value, list) else [value] if value is not None else []
    return str(values[0]) if len(values) == 1 else None


def generate_synthetic(run_dir: str | Path, manifest_path: str | Path, out: str | Path, *,
                       filters: dict[str, list[str]] | None = None, direction: str = "a2b",
                       max_images: int | None = None, seed: int = 0, progress: bool = True,
                       allow_outside_root: bool = False) -> dict:
    """Translate the ``filters`` rows of ``manifest_path`` (default: the generator's source domain) into ``out``."""
    started = time.perf_counter()
    gen = load_generator(run_dir, direction)
    record = gen.record
    source_key, target_key = ("a", "b") if direction == "a2b" else ("b", "a")
    if not filters:
        filters = {k: [str(x) for x in (v if isinstance(v, list) else [v])]
                   for k, v in record.domains[source_key]["filter"].items()}
    manifest = Manifest.read(manifest_path)
    rows = manifest.filter(**filters)
    rows = rows.subset(mask=~synthetic_mask(rows.table))
    if max_images is not None and len(rows) > max_images:
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), max_images, replace=False))
        rows = rows.replace(rows.table.iloc[pick])
    if not len(rows):
        raise CovidCXRError(f"{manifest.name}: no real row matches {filters}; nothing to generate")
    held = ~rows.table["split"].isin(ALLOWED_SPLITS)
    if held.any():
        raise CovidCXRError(f"{manifest.name}: {int(held.sum())} of the {len(rows)} selected rows are in val / test / "
                            f"external (e.g. {rows.table.loc[held, 'image'].iloc[0]}); synthetic images are training-only "
                            "and must not be made from held-out images. Add --filter split=train")
    paths = rows.image_paths(check_root=not allow_outside_root)
    out = Path(out)
    if (out / "manifest.csv").exists():
        raise CovidCXRError(f"{out}: already holds a synthetic manifest; choose a new --out")
    label = _target_label(record.domains[target_key])
    made, skipped = [], []
    bar = make_progress("img", disable=not progress)
    with bar:
        task = bar.add_task(f"translating {record.domains[source_key]['name']} -> {record.domains[target_key]['name']}",
                            total=len(paths))
        for k, (row, path) in enumerate(zip(rows.table.itertuples(index=False), paths)):
            try:
                pixels = read_xray(path).pixels
            except CovidCXRError as exc:
                skipped.append({"image": row.image, "reason": getattr(exc, "reason", str(exc))})
                bar.advance(task)
                continue
            image = gen.translate([pixels])[0]
            name = f"images/{k:05d}_{Path(row.image).stem}_{direction}.png"
            ok, data = cv2.imencode(".png", np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
            atomic_write_bytes(out / name, data.tobytes(), fsync=False)
            made.append({"image": name, "label": label or row.label,
                         **{c: getattr(row, c) for c in COPIED_COLUMNS},
                         "synthetic": "true", "generator_sha256": gen.sha256, "source_image": _portable(path),
                         "source_patient_id": row.patient_id, "source_label": row.label,
                         "notes": f"CycleGAN {direction} ({record.domains[source_key]['name']} -> "
                                  f"{record.domains[target_key]['name']}) of {row.image}"})
            bar.advance(task)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "skipped.csv", pd.DataFrame(skipped, columns=["image", "reason"]))
    if not made:
        raise CovidCXRError(f"{out}: no image could be translated (reasons in skipped.csv)")
    synthetic = Manifest(pd.DataFrame(made), root=out, name="synthetic manifest")
    synthetic.write(out / "manifest.csv")
    summary = {"run": str(run_dir), "direction": direction, "generator_sha256": gen.sha256,
               "run_record_sha256": record.integrity.record_sha256 if record.integrity else None,
               "source_manifest": str(manifest_path),
               "source_manifest_sha256": hashlib.sha256(Path(manifest_path).read_bytes()).hexdigest(),
               "filters": filters, "images": len(made), "skipped": len(skipped), "label": label,
               "image_size": gen.spec.image_size, "seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "generation.json", summary)
    return summary
