"""The import formats: each lists candidate rows (absolute image path, finding, label, patient,
demographics) and early skips; :func:`covidcxr.data.importers.import_dataset` does the rest.

Every importer takes the path plus the options it names (no ``**kwargs``): ``source`` (the
``source`` column), ``labels`` (``dicom``: the labels CSV), and, where the importer opens files itself,
``check_images`` / ``allow_outside_root``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from covidcxr.data.importers.base import (
    IMAGE_SUFFIXES, Candidates, _frame, _number_or_blank, _prefix_for, _require_dir, _text, label_from_finding,
    reason_without_content, register_importer,
)
from covidcxr.data.manifest import LABELS, Manifest, outside_roots, read_csv_table
from covidcxr.errors import ConfigError, CovidCXRError, ManifestError


@register_importer("covidcxr")
def import_covidcxr_manifest(path: Path, *, allow_outside_root: bool = False) -> Candidates:
    """A covidcxr manifest CSV (PATH is the CSV, or a folder holding ``manifest.csv``). Its image paths
    must lie inside its folder (or ``$COVIDCXR_DATA_ROOT``) unless ``allow_outside_root``."""
    path = Path(path)
    csv = path / "manifest.csv" if path.is_dir() else path
    m = Manifest.read(csv)
    paths = m.image_paths(check_root=not allow_outside_root)
    rows = m.table.copy()
    rows["image"] = [str(p) for p in paths]
    rows = rows.drop(columns=["age_years"])
    rows["__origin__"] = [f"{csv.name} row {k + 1}" for k in range(len(rows))]
    return Candidates(rows, root=m.root)


@register_importer("ieee8023")
def import_ieee8023(path: Path, *, source: str | None = None) -> Candidates:
    """ieee8023 / Figure1 / Actualmed layout: PATH is the repository folder (with ``metadata.csv``)
    or the ``metadata.csv`` itself. CT (and other non-X-ray modality) rows are skipped here; lateral
    views by the shared frontal-view rule of :func:`~covidcxr.data.importers.import_dataset`."""
    path = Path(path)
    csv = path / "metadata.csv" if path.is_dir() else path
    _require_dir(csv, "ieee8023-style metadata.csv")
    repo = csv.parent
    meta = read_csv_table(csv, what="an ieee8023-style metadata file")
    meta.columns = [c.strip() for c in meta.columns]
    if "patientid" not in meta.columns or "finding" not in meta.columns:
        raise ManifestError(f"{csv}: not an ieee8023-style metadata file (needs 'patientid' and 'finding' columns; "
                            f"found {list(meta.columns)[:12]})")
    source = source or repo.name
    prefix = _prefix_for(source)
    cand = Candidates(pd.DataFrame(), root=repo)
    name_col = next((c for c in ("filename", "imagename", "image") if c in meta.columns), None)
    records = []
    for i, r in meta.iterrows():
        folder = _text(r.get("folder", "")) or "images"
        if name_col and _text(r[name_col]):
            image = repo / folder / _text(r[name_col])
        else:  # Figure1: the image is images/<patientid>.<ext>
            stem = repo / folder / _text(r["patientid"])
            image = next((stem.with_name(stem.name + ext) for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
                          if stem.with_name(stem.name + ext).exists()), stem.with_name(stem.name + ".jpg"))
        modality = _text(r.get("modality", "X-ray")).lower()
        if modality and modality not in ("x-ray", "xray", "cr", "dx"):
            cand.skip(image, f"modality {r.get('modality')}: not a chest X-ray")
            continue
        records.append({
            "image": str(image), "finding": _text(r["finding"]), "patient_id": f"{prefix}:{_text(r['patientid'])}",
            "source": source, "view": _text(r.get("view", "")), "sex": _text(r.get("sex", "")),
            "age": _text(r.get("age", "")), "offset_days": _number_or_blank(r.get("offset", "")),
            "license": _text(r.get("license", "")), "notes": f"metadata row {i + 2}",
            "__origin__": f"{csv.name} row {i + 1}",
        })
    cand.rows = _frame(records)
    cand.rows["label"] = cand.rows["finding"].map(label_from_finding)
    return cand


_KERMANY_ID = re.compile(r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)
_FOLDER_CLASSES = {  # folder name (lower case) -> (label, finding)
    "normal": ("normal", "Normal"), "pneumonia": ("pneumonia", "Pneumonia"),
    "covid": ("covid", "COVID-19"), "covid-19": ("covid", "COVID-19"), "covid19": ("covid", "COVID-19"),
    "viral pneumonia": ("pneumonia", "Pneumonia/Viral"), "bacterial pneumonia": ("pneumonia", "Pneumonia/Bacterial"),
    "lung_opacity": ("other", "Lung Opacity"), "lung opacity": ("other", "Lung Opacity"),
    "other": ("other", "Other"),  # covidcxr's own images/<source>/<label>/ layout
}
_SKIP_DIRS = {"__macosx", "masks", "mask"}


@register_importer("folders")
def import_class_folders(path: Path, *, source: str | None = None) -> Candidates:
    """Class-per-folder trees (Kaggle chest_xray / Kermany, COVID-19 Radiography Database, ...)."""
    root = _require_dir(Path(path), "class-per-folder data set")
    source = source or root.name
    cand = Candidates(pd.DataFrame(), root=root)
    records, unnamed = [], 0
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        parts = [s.lower() for s in rel.parts[:-1]]
        if any(s in _SKIP_DIRS or s.startswith(".") for s in parts) or file.name.startswith("."):
            continue
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            if file.suffix.lower() not in (".csv", ".txt", ".md", ".xlsx", ".json", ".yaml", ".yml"):
                cand.skip(file, f"not an image file ({file.suffix or 'no extension'})")
            continue
        klass = next((s for s in reversed(parts) if s in _FOLDER_CLASSES), None)
        if klass is None:
            cand.skip(file, "not inside a class folder (NORMAL, PNEUMONIA, COVID, Viral Pneumonia, Lung_Opacity)")
            continue
        label, finding = _FOLDER_CLASSES[klass]
        lower = file.stem.lower()
        if label == "pneumonia" and ("bacteria" in lower or "virus" in lower):
            finding = "Pneumonia/Bacterial" if "bacteria" in lower else "Pneumonia/Viral"
        m = _KERMANY_ID.match(file.name)
        if m:
            pid = f"kermany:{m.group(1) or m.group(2)}"
        else:
            pid = f"{_prefix_for(source)}:{file.stem}"
            unnamed += 1
        split_dir = next((s for s in parts if s in ("train", "val", "test")), "")
        records.append({"image": str(file), "finding": finding, "label": label, "patient_id": pid,
                        "source": source, "original_split": split_dir, "__origin__": f"file {rel.as_posix()}"})
    if unnamed:
        cand.warnings.append(f"{unnamed} image(s) in {root} carry no patient id (file names do not follow the Kermany "
                             "'personNNN_' / 'IM-NNNN-' pattern): each got its own patient id, so grouping a "
                             "patient's images into one split is impossible for them; treat splits as image-level")
    cand.rows = _frame(records)
    return cand


_COVIDX_CLASSES = {"covid-19": "covid", "covid": "covid", "positive": "covid", "normal": "normal",
                   "pneumonia": "pneumonia"}


@register_importer("covidx")
def import_covidx(path: Path, *, source: str | None = None) -> Candidates:
    """COVIDx: PATH is the folder with ``train.txt`` / ``test.txt`` (and ``train/``, ``test/``) or one .txt file."""
    path = Path(path)
    _require_dir(path, "COVIDx folder or label file")
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.txt") if p.stem.lower() in ("train", "test", "val"))
    if not files:
        raise ManifestError(f"{path}: no COVIDx label files (train.txt / test.txt) found")
    root = files[0].parent
    cand = Candidates(pd.DataFrame(), root=root)
    records = []
    for txt in files:
        split = re.sub(r"[^a-z]", "", txt.stem.lower()) or "train"
        for n, line in enumerate(txt.read_text(errors="replace").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 3:
                cand.skip(f"{txt.name} line {n}", f"malformed line (need 'patient_id filename class [source]'): {line[:60]!r}")
                continue
            pid, filename, klass = parts[0], parts[1], parts[2]
            data_source = parts[3] if len(parts) > 3 else (source or "covidx")
            image = root / split / filename
            records.append({"image": str(image), "finding": klass, "label": _COVIDX_CLASSES.get(klass.lower()),
                            "patient_id": f"{_prefix_for(data_source)}:{pid}", "source": data_source,
                            "original_split": split, "__origin__": f"{txt.name} line {n}"})
    cand.rows = _frame(records)
    bad = cand.rows["label"].isna()
    for img, klass in zip(cand.rows.loc[bad, "image"], cand.rows.loc[bad, "finding"]):
        cand.skip(img, f"COVIDx class {klass!r} is not covid / normal / pneumonia; map it with a --label-map rule "
                       f"{{finding_exact: {klass}, class: ...}}")
    cand.rows.loc[bad, "label"] = "__skipped__"
    return cand


def _header_text(value) -> str:
    """A DICOM header string without padding (DICOM pads with spaces and NUL bytes)."""
    return str(value or "").replace("\x00", "").strip()


def _dicom_age(age: str) -> str:
    """DICOM PatientAge ``'045Y'`` -> ``'45'``; ``'018M'`` / ``'003W'`` / ``'010D'`` keep their unit
    (the manifest reads ``18M`` as 1.5 years); anything else as it is."""
    m = re.match(r"^0*(\d+)([YMWD])$", age.strip().upper())
    if not m:
        return age
    return m.group(1) if m.group(2) == "Y" else f"{m.group(1)}{m.group(2)}"


@register_importer("dicom")
def import_dicom_folder(path: Path, *, labels: str | Path | None = None, source: str | None = None,
                        check_images: bool = True, allow_outside_root: bool = False) -> Candidates:
    """A folder of DICOM files plus a labels CSV (``--labels``, default ``PATH/labels.csv``) with a
    ``file`` column (relative to PATH, or absolute) and ``label`` and/or ``finding``.

    Each file is read with :func:`~covidcxr.data.io.read_xray` (which refuses non-frontal / non-chest
    DICOMs); patient id and view come from its ``meta`` (``PatientID``, ``ViewPosition``) unless the CSV
    gives them, sex / age from ``PatientSex`` / ``PatientAge``. With ``check_images=False`` only the
    header is read. Files outside PATH (and ``$COVIDCXR_DATA_ROOT``) are refused before they are
    opened unless ``allow_outside_root``.
    """
    import pydicom

    from covidcxr.data.io import read_xray
    from covidcxr.paths import data_root

    root = _require_dir(Path(path), "DICOM folder")
    labels_csv = Path(labels) if labels else root / "labels.csv"
    if not labels_csv.is_file():
        raise ConfigError(f"{labels_csv}: labels CSV not found; pass --labels FILE.csv with columns 'file' and 'label'")
    table = read_csv_table(labels_csv, what="a DICOM labels CSV")
    if "file" not in table.columns or not ({"label", "finding"} & set(table.columns)):
        raise ManifestError(f"{labels_csv}: needs a 'file' column and a 'label' or 'finding' column (found {list(table.columns)})")
    files = [Path(f) if Path(f).is_absolute() else root / f for f in table["file"]]
    if not allow_outside_root:
        roots = [root, data_root()]
        checkable = [k for k, f in enumerate(files) if "\x00" not in str(f)]  # NUL names are skipped below
        bad = [checkable[j] for j in outside_roots([files[k] for k in checkable], roots)]
        if bad:
            k = bad[0]
            raise ManifestError(f"{labels_csv.name} row {k + 1}, column 'file': {table['file'].iloc[k]!r} resolves outside "
                                f"the data root ({', '.join(map(str, roots))}); {len(bad)} row(s) in all. Refused before "
                                "opening it; pass allow_outside_root=True (CLI: --allow-outside-root) to import it")
    source = source or root.name
    cand = Candidates(pd.DataFrame(), root=root)
    records = []
    for i, r in table.iterrows():
        file = files[i]
        finding = _text(r.get("finding", "")) or _text(r.get("label", ""))
        label = _text(r.get("label", "")).lower() or label_from_finding(finding)
        if label and label not in LABELS:
            cand.skip(file, f"{labels_csv.name} row {i + 1}: label {label!r} is not one of {list(LABELS)}")
            continue
        if "\x00" in str(file) or not file.is_file():
            cand.skip(file, "file not found" if "\x00" not in str(file) else "file name contains a NUL byte")
            continue
        try:
            meta = read_xray(file).meta if check_images else None
            if meta is not None and meta.get("format") != "dicom":
                cand.skip(file, f"not a DICOM file (its content is {meta.get('format', 'unknown').upper()})")
                continue
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except CovidCXRError as exc:
            cand.skip(file, reason_without_content(getattr(exc, "reason", str(exc))))
            continue
        except Exception as exc:  # pydicom raises many types for non-DICOM input
            cand.skip(file, reason_without_content(f"not a readable DICOM file: {type(exc).__name__}: {exc}")[:200])
            continue
        header = meta or {"patient_id": _header_text(ds.get("PatientID", "")),
                          "view_position": _header_text(ds.get("ViewPosition", "")).upper()}
        record = {"image": str(file), "finding": finding, "label": label or None,
                  "source": _text(r.get("source", "")) or source, "__origin__": f"{labels_csv.name} row {i + 1}"}
        pid = _text(r.get("patient_id", "")) or _header_text(header.get("patient_id", ""))
        if not pid:
            cand.skip(file, "no patient id (empty DICOM PatientID and no patient_id column)")
            continue
        record["patient_id"] = pid if ":" in pid else f"{_prefix_for(record['source'])}:{pid}"
        record["view"] = _text(r.get("view", "")) or _header_text(header.get("view_position", ""))
        record["sex"] = _text(r.get("sex", "")) or _header_text(ds.get("PatientSex", ""))
        record["age"] = _text(r.get("age", "")) or _dicom_age(_header_text(ds.get("PatientAge", "")))
        record["study_date"] = _header_text(header.get("study_date", ""))
        records.append(record)
        cand.checked.add(str(file))
    cand.rows = _frame(records)
    return cand
