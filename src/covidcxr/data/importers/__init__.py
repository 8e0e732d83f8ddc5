"""Importers: the layouts people download -> a :class:`~covidcxr.data.manifest.Manifest`.

``import_dataset(format, path, ...)`` looks the format up in :data:`IMPORTERS` (a registry; add one
with :func:`register_importer`, listing its options by name). Each importer lists candidate rows
(image path, finding, label, patient, demographics); the shared tail then refuses image paths outside
the data root, skips non-frontal views (the reader's rule, :data:`covidcxr.data.io.NON_FRONTAL_VIEWS`),
applies a ``--label-map`` YAML, checks every image with :func:`covidcxr.data.io.decode_xray`
(missing, unreadable and non-frontal files are skipped) and returns the manifest plus a table of every
skipped candidate and why. Nothing is dropped silently; skip reasons never quote file content.

Formats (:mod:`covidcxr.data.importers.formats`):

``covidcxr``   a covidcxr manifest CSV (e.g. ``../shared/data/cxr/manifest.csv``)
``ieee8023``   ``metadata.csv`` + ``images/`` of ieee8023/covid-chestxray-dataset; the Figure1 and
               Actualmed repositories use the same layout (``filename`` or ``imagename`` column, or
               ``<patientid>.jpg/.png``). Frontal X-ray rows only; CT and lateral rows are skipped.
``folders``    class-per-folder trees: Kaggle ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``
               (Kermany; patient id from the file name) and the COVID-19 Radiography Database
               (``COVID/``, ``Normal/``, ``Viral Pneumonia/``, ``Lung_Opacity/``, optionally with
               ``images/`` sub-folders; no patient ids, so one patient per image, with a warning).
``covidx``     COVIDx label files ``train.txt`` / ``test.txt`` (``patient_id filename class source``)
               with images under ``train/`` and ``test/``.
``dicom``      a folder of DICOM files plus a labels CSV (``file`` and ``label`` or ``finding``
               columns); patient id and view come from the DICOM header.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr.data.importers import formats as _formats  # noqa: F401  (registers the formats)
from covidcxr.data.importers.base import (  # noqa: F401  (public names of covidcxr.data.importers)
    IMAGE_SUFFIXES, IMPORTERS, KNOWN_PREFIXES, SHARED_OPTIONS, VIEW_SPELLINGS, Candidates, ImportResult, Importer,
    check_options, importer_options, label_from_finding, non_frontal_kind, read_image_bytes, reason_without_content,
    register_importer, view_code,
)
from covidcxr.data.importers.formats import (  # noqa: F401
    import_class_folders, import_covidcxr_manifest, import_covidx, import_dicom_folder, import_ieee8023,
)
from covidcxr.data.labels import LabelSpace, read_label_space
from covidcxr.data.manifest import AGE_RANGE, LABELS, Manifest, age_problem, outside_roots
from covidcxr.errors import ConfigError, CovidCXRError, ManifestError


def _check_images(rows: pd.DataFrame, cand: Candidates, *, check_images: bool, progress: bool) -> np.ndarray:
    """Mask of rows whose file exists, is not a byte-identical copy of an earlier row's file (e.g. the
    nested ``chest_xray/chest_xray`` copy in the Kaggle zip) and, with ``check_images``, decodes as a
    frontal chest X-ray."""
    import hashlib

    from covidcxr.data.io import decode_xray
    from covidcxr.progress import make_progress

    ok = np.ones(len(rows), dtype=bool)
    first_with: dict[str, str] = {}
    with make_progress(disable=not progress) as bar:
        task = bar.add_task("checking images", total=len(rows))
        for k, image in enumerate(rows["image"]):
            bar.advance(task)
            p = Path(image)
            try:
                data = read_image_bytes(p)  # folders, FIFOs, devices are refused unopened
            except CovidCXRError as exc:
                cand.skip(p, reason_without_content(getattr(exc, "reason", str(exc))))
                ok[k] = False
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in first_with:
                cand.skip(p, f"identical file content to {first_with[digest]} (kept that one)")
                ok[k] = False
                continue
            first_with[digest] = str(p)
            if check_images and image not in cand.checked:
                try:
                    decode_xray(data, p)
                except CovidCXRError as exc:
                    cand.skip(p, reason_without_content(getattr(exc, "reason", str(exc))))
                    ok[k] = False
    return ok


def _drop(rows: pd.DataFrame, mask, cand: Candidates, reasons) -> pd.DataFrame:
    """Skip the rows of ``mask`` (each with its reason) and return the others."""
    mask = np.asarray(mask, dtype=bool)
    for img, reason in zip(rows.loc[mask, "image"], reasons):
        cand.skip(img, reason)
    return rows[~mask].reset_index(drop=True)


def _refuse_outside_root(rows: pd.DataFrame, root: Path) -> None:
    from covidcxr.paths import data_root

    roots = [root, data_root()]
    bad = outside_roots(list(rows["image"]), roots)
    if bad:
        k = bad[0]
        raise ManifestError(f"{_origin(rows, k)}: image {rows['image'].iloc[k]!r} resolves to {os.path.realpath(rows['image'].iloc[k])}, "
                            f"outside the data root ({', '.join(str(Path(os.path.realpath(r))) for r in roots)}); "
                            f"{len(bad)} candidate(s) in all. Refused before opening it; pass allow_outside_root=True "
                            "(CLI: --allow-outside-root) if these files are meant to be imported")


def _origin(rows: pd.DataFrame, k: int) -> str:
    return rows["__origin__"].iloc[k] if "__origin__" in rows.columns and rows["__origin__"].iloc[k] else f"candidate {k + 1}"


def _refuse_bad_ages(rows: pd.DataFrame) -> None:
    """An age outside 0-120 years is a data error (as in :func:`~covidcxr.data.manifest.validate_table`),
    named by the source row it came from."""
    if "age" not in rows.columns:
        return
    problems = rows["age"].map(age_problem)
    bad = np.flatnonzero(problems.notna().to_numpy())
    if len(bad):
        k = int(bad[0])
        raise ManifestError(f"{_origin(rows, k)}, column 'age': {rows['age'].iloc[k]!r} is not an age between "
                            f"{AGE_RANGE[0]:g} and {AGE_RANGE[1]:g} years ({problems.iloc[k]}; {len(bad)} candidate(s) "
                            "in all); correct it or leave it empty in the source")


def import_dataset(format: str, path: str | Path, *, out: str | Path | None = None,
                   label_map: str | Path | LabelSpace | None = None, check_images: bool = True,
                   progress: bool = True, allow_outside_root: bool = False, **options) -> ImportResult:
    """Import a downloaded data set as a manifest.

    ``label_map``: YAML rules (see :mod:`covidcxr.data.labels`) over the ``finding`` / ``label``
    columns that override the default finding -> label mapping; a rule with ``class: null`` drops the
    rows it matches. ``check_images``: decode each image with ``read_xray`` (skip unreadable /
    non-frontal files); otherwise only check that files exist. ``allow_outside_root``: also import
    images that resolve (after symlinks) outside PATH's data folder and ``$COVIDCXR_DATA_ROOT``
    (refused by default, before any is opened). ``out``: write the manifest there and the skipped
    candidates to ``<out>.skipped.csv``. ``options`` go to the importer (``source``; ``labels`` for
    ``dicom``); one the importer does not take is a :class:`~covidcxr.errors.ConfigError`.
    """
    if format not in IMPORTERS:
        raise ConfigError(f"unknown import format {format!r}; use one of {sorted(IMPORTERS)}")
    importer = IMPORTERS[format]
    check_options(format, importer, options)
    shared = {"check_images": check_images, "allow_outside_root": allow_outside_root}
    takes = importer_options(importer)
    cand = importer(Path(path), **options, **{k: v for k, v in shared.items() if k in takes})
    rows = cand.rows.reset_index(drop=True)
    if "__origin__" not in rows.columns:
        rows["__origin__"] = ""

    text_cols = [c for c in rows.columns if rows[c].dtype == object or pd.api.types.is_string_dtype(rows[c])]
    nul = {c: rows[c].map(lambda v: isinstance(v, str) and "\x00" in v).to_numpy(dtype=bool) for c in text_cols}
    has_nul = np.logical_or.reduce(list(nul.values())) if nul else np.zeros(len(rows), dtype=bool)
    rows = _drop(rows, has_nul, cand, [f"column {next(c for c in text_cols if nul[c][k])!r} contains a NUL byte "
                                       "(refused: NUL bytes cut file names and hide text)" for k in np.flatnonzero(has_nul)])
    if not allow_outside_root:
        _refuse_outside_root(rows, cand.root)
    _refuse_bad_ages(rows)
    if "view" in rows.columns:  # the reader's frontal-view rule, for every format
        kinds = rows["view"].map(non_frontal_kind)
        lateral = kinds.notna().to_numpy()
        rows = _drop(rows, lateral, cand, [f"view {v}: not frontal ({k})" for v, k in
                                           zip(rows.loc[lateral, "view"], kinds[lateral])])

    if label_map is not None:
        space = label_map if isinstance(label_map, LabelSpace) else read_label_space(label_map, classes=LABELS)
        mapped, decided = space.apply_rules(rows)
        excluded = decided & pd.isna(mapped)
        rows.loc[decided, "label"] = mapped[decided]
        rows = _drop(rows, excluded, cand, ["excluded by the label map"] * int(excluded.sum()))

    rows = rows[~rows["label"].eq("__skipped__").to_numpy()].reset_index(drop=True)
    unlabelled = (rows["label"].isna() | rows["label"].eq("")).to_numpy()
    findings = rows["finding"] if "finding" in rows.columns else pd.Series([""] * len(rows))
    rows = _drop(rows, unlabelled, cand, [f"no usable finding ({f!r}); add a --label-map rule for it"
                                          for f in findings[unlabelled]])
    dup = rows["image"].duplicated(keep="first").to_numpy()
    rows = _drop(rows, dup, cand, ["listed more than once (kept the first row)"] * int(dup.sum()))

    ok = _check_images(rows, cand, check_images=check_images, progress=progress)
    rows = rows[ok].reset_index(drop=True).drop(columns=["__origin__"])
    if rows.empty:
        raise ManifestError(f"{path}: no usable image found as format {format!r} "
                            f"({len(cand.skipped)} candidate(s) skipped, e.g. "
                            f"{cand.skipped[0] if cand.skipped else 'none'})")
    manifest = Manifest(rows, root=cand.root, name=Path(out).name if out else f"{format}:{Path(path).name}")
    skipped = pd.DataFrame(cand.skipped, columns=["image", "reason"])
    result = ImportResult(manifest, skipped, list(cand.warnings))
    if out is not None:
        from covidcxr.files import write_csv

        manifest.write(out)
        write_csv(skipped_path(out), skipped)
    return result


def skipped_path(out: str | Path) -> Path:
    """Where :func:`import_dataset` writes the skipped list for manifest ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".skipped.csv") if out.suffix == "" else out.with_suffix(".skipped.csv")
