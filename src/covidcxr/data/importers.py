"""Importers: the layouts people download -> a :class:`~covidcxr.data.manifest.Manifest`.

``import_dataset(format, path, ...)`` looks the format up in :data:`IMPORTERS` (a registry; add one
with :func:`register_importer`). Each importer lists candidate rows (image path, finding, label,
patient, demographics); the shared tail then applies a ``--label-map`` YAML, checks every image
with :func:`covidcxr.data.io.read_xray` (missing, unreadable and non-frontal files are skipped) and
returns the manifest plus a table of every skipped candidate and why. Nothing is dropped silently.

Formats:

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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from covidcxr.data.labels import LabelSpace, read_label_space
from covidcxr.data.manifest import LABELS, Manifest, source_short_name
from covidcxr.errors import ConfigError, CovidCXRError, ManifestError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
FRONTAL_VIEWS = {"PA", "AP", "AP SUPINE", "AP ERECT", "AP SEMI ERECT", "APS", "AP SEMI-ERECT"}

#: Short names (patient-id prefixes) of well-known sources, by repository / folder / COVIDx source name.
KNOWN_PREFIXES = {
    "covid-chestxray-dataset": "ieee8023", "cohen": "ieee8023",
    "figure1-covid-chestxray-dataset": "figure1", "fig1": "figure1",
    "actualmed-covid-chestxray-dataset": "actualmed", "actmed": "actualmed",
    "chest_xray": "kermany", "rsna": "rsna", "sirm": "sirm", "ricord": "ricord", "bimcv": "bimcv",
    "stonybrook": "stonybrook",
}


@dataclass
class ImportResult:
    """What an import produced: the manifest and every candidate it skipped (``image, reason``)."""

    manifest: Manifest
    skipped: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    def skipped_summary(self) -> pd.DataFrame:
        """Skipped candidates counted by reason (``reason, images, example``)."""
        if self.skipped.empty:
            return pd.DataFrame(columns=["reason", "images", "example"])
        g = self.skipped.groupby("reason", sort=False)
        return pd.DataFrame({"images": g.size(), "example": g["image"].first()}).reset_index() \
            .sort_values("images", ascending=False, ignore_index=True)

    def render(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        t = self.manifest.table
        table = Table(title=f"imported {len(t)} images, {t['patient_id'].nunique()} patients", title_justify="left")
        table.add_column("source")
        labels = sorted(t["label"].unique())
        for lab in labels:
            table.add_column(lab, justify="right")
        for source, rows in t.groupby("source"):
            counts = rows["label"].value_counts()
            table.add_row(source, *[str(int(counts.get(lab, 0))) for lab in labels])
        console.print(table)
        summary = self.skipped_summary()
        if summary.empty:
            console.print("skipped 0 candidates")
        skipped = Table(title=f"skipped {len(self.skipped)} candidate(s)", title_justify="left")
        for c in ("reason", "images", "example"):
            skipped.add_column(c, overflow="fold", justify="right" if c == "images" else "left")
        for _, r in summary.iterrows():
            skipped.add_row(r["reason"], str(r["images"]), str(r["example"]))
        if not summary.empty:
            console.print(skipped)
        for w in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


@dataclass
class Candidates:
    """What an importer found before the shared checks: rows (``image`` absolute) and early skips."""

    rows: pd.DataFrame
    root: Path
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: set[str] = field(default_factory=set)  # images the importer already decoded

    def skip(self, image, reason: str) -> None:
        self.skipped.append({"image": str(image), "reason": reason})


Importer = Callable[..., Candidates]
IMPORTERS: dict[str, Importer] = {}


def register_importer(name: str):
    """Decorator: register ``fn(path: Path, **options) -> Candidates`` as import format ``name``."""
    def deco(fn: Importer) -> Importer:
        IMPORTERS[name] = fn
        return fn
    return deco


# ---------------------------------------------------------------------- finding strings -> labels
_NO_LABEL = re.compile(r"^\s*(|todo|unknown|inconclusive|n/?a|none|nan)\s*$", re.IGNORECASE)
_NORMAL = re.compile(r"^\s*(no[ _]finding|normal|no pneumonia|negative for pneumonia)\s*$", re.IGNORECASE)
_OTHER_FIRST = re.compile(r"lipoid|lung[ _]opacity|aspiration", re.IGNORECASE)  # named "pneumonia" but not infectious
_PNEUMONIA = re.compile(
    r"pneumon|sars|mers|streptococc|pneumocystis|klebsiella|mycoplasma|legionella|varicella|e\.?\s?coli|"
    r"bacteri|chlamydophila|influenza|viral|virus|staphylococc|nocardia|aspergill|candida|herpes|h1n1",
    re.IGNORECASE)


def label_from_finding(finding: str) -> str | None:
    """Default mapping of a source's finding string to ``covid / normal / pneumonia / other``.

    As the shared data README: COVID-19 (also ``Pneumonia/Viral/COVID-19``, ``COVID-19, ARDS``) ->
    covid; ``No Finding`` / ``Normal`` -> normal; infectious pneumonias (SARS, bacterial, viral, fungal
    ...) -> pneumonia; lipoid pneumonia, lung opacity and anything else named (ARDS, tuberculosis...)
    -> other. Empty / ``todo`` / ``inconclusive`` -> ``None`` (skipped).
    """
    f = "" if finding is None else str(finding)
    if _NO_LABEL.match(f):
        return None
    if re.search(r"covid|sars-cov-2|^positive$", f, re.IGNORECASE):
        return "covid"
    if _NORMAL.match(f):
        return "normal"
    if _OTHER_FIRST.search(f):
        return "other"
    if _PNEUMONIA.search(f):
        return "pneumonia"
    return "other"


# ---------------------------------------------------------------------- helpers
def _prefix_for(name: str) -> str:
    key = source_short_name(name)
    return KNOWN_PREFIXES.get(key, key)


def _frame(records: list[dict]) -> pd.DataFrame:
    cols = ["image", "finding", "label", "patient_id", "source", "view", "sex", "age", "offset_days"]
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame(columns=cols)
    for c in cols:
        if c not in df.columns:
            df[c] = ""
    return df


def _text(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return str(v).strip()


def _number_or_blank(v) -> str:
    """A source's free-text number (e.g. ieee8023 ``offset``): kept if numeric, else unknown."""
    text = _text(v)
    try:
        float(text)
    except ValueError:
        return ""
    return text


def _require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{path}: not found ({what})")
    return path


# ---------------------------------------------------------------------- importers
@register_importer("covidcxr")
def import_covidcxr_manifest(path: Path, **_) -> Candidates:
    """A covidcxr manifest CSV (PATH is the CSV, or a folder holding ``manifest.csv``)."""
    path = Path(path)
    csv = path / "manifest.csv" if path.is_dir() else path
    m = Manifest.read(csv)
    rows = m.table.copy()
    rows["image"] = [str(p) for p in m.image_paths()]
    rows = rows.drop(columns=["age_years"])
    return Candidates(rows, root=m.root)


@register_importer("ieee8023")
def import_ieee8023(path: Path, *, source: str | None = None, **_) -> Candidates:
    """ieee8023 / Figure1 / Actualmed layout: PATH is the repository folder (with ``metadata.csv``)
    or the ``metadata.csv`` itself."""
    path = Path(path)
    csv = path / "metadata.csv" if path.is_dir() else path
    _require_dir(csv, "ieee8023-style metadata.csv")
    repo = csv.parent
    try:
        meta = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding_errors="replace")
    except (ValueError, pd.errors.ParserError) as exc:
        raise ManifestError(f"{csv}: cannot be read as CSV ({exc})") from exc
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
        view = _text(r.get("view", ""))
        if modality and modality not in ("x-ray", "xray", "cr", "dx"):
            cand.skip(image, f"modality {r.get('modality')}: not a chest X-ray")
            continue
        if view and view.upper() not in FRONTAL_VIEWS:
            cand.skip(image, f"view {view}: not frontal")
            continue
        records.append({
            "image": str(image), "finding": _text(r["finding"]), "patient_id": f"{prefix}:{_text(r['patientid'])}",
            "source": source, "view": view, "sex": _text(r.get("sex", "")), "age": _text(r.get("age", "")),
            "offset_days": _number_or_blank(r.get("offset", "")), "license": _text(r.get("license", "")),
            "notes": f"metadata row {i + 2}",
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
def import_class_folders(path: Path, *, source: str | None = None, **_) -> Candidates:
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
                        "source": source, "original_split": split_dir})
    if unnamed:
        cand.warnings.append(f"{unnamed} image(s) in {root} carry no patient id (file names do not follow the Kermany "
                             "'personNNN_' / 'IM-NNNN-' pattern): each got its own patient id, so grouping a "
                             "patient's images into one split is impossible for them; treat splits as image-level")
    cand.rows = _frame(records)
    return cand


_COVIDX_CLASSES = {"covid-19": "covid", "covid": "covid", "positive": "covid", "normal": "normal",
                   "pneumonia": "pneumonia"}


@register_importer("covidx")
def import_covidx(path: Path, *, source: str | None = None, **_) -> Candidates:
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
                            "original_split": split})
    cand.rows = _frame(records)
    bad = cand.rows["label"].isna()
    for img, klass in zip(cand.rows.loc[bad, "image"], cand.rows.loc[bad, "finding"]):
        cand.skip(img, f"COVIDx class {klass!r} is not covid / normal / pneumonia; map it with a --label-map rule "
                       f"{{finding_exact: {klass}, class: ...}}")
    cand.rows.loc[bad, "label"] = "__skipped__"
    return cand


@register_importer("dicom")
def import_dicom_folder(path: Path, *, labels: str | Path | None = None, source: str | None = None,
                        check_images: bool = True, **_) -> Candidates:
    """A folder of DICOM files plus a labels CSV (``--labels``, default ``PATH/labels.csv``) with a
    ``file`` column (relative to PATH, or absolute) and ``label`` and/or ``finding``.

    Each file is read with :func:`~covidcxr.data.io.read_xray` (which refuses non-frontal / non-chest
    DICOMs); patient id and view come from its ``meta`` (``PatientID``, ``ViewPosition``) unless the CSV
    gives them, sex / age from ``PatientSex`` / ``PatientAge``. With ``check_images=False`` only the
    header is read.
    """
    import pydicom

    from covidcxr.data.io import read_xray

    root = _require_dir(Path(path), "DICOM folder")
    labels_csv = Path(labels) if labels else root / "labels.csv"
    if not labels_csv.is_file():
        raise ConfigError(f"{labels_csv}: labels CSV not found; pass --labels FILE.csv with columns 'file' and 'label'")
    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    if "file" not in table.columns or not ({"label", "finding"} & set(table.columns)):
        raise ManifestError(f"{labels_csv}: needs a 'file' column and a 'label' or 'finding' column (found {list(table.columns)})")
    source = source or root.name
    cand = Candidates(pd.DataFrame(), root=root)
    records = []
    for i, r in table.iterrows():
        file = Path(r["file"])
        file = file if file.is_absolute() else root / file
        finding = _text(r.get("finding", "")) or _text(r.get("label", ""))
        label = _text(r.get("label", "")).lower() or label_from_finding(finding)
        if label and label not in LABELS:
            cand.skip(file, f"{labels_csv.name} row {i + 1}: label {label!r} is not one of {list(LABELS)}")
            continue
        if not file.is_file():
            cand.skip(file, "file not found")
            continue
        try:
            meta = read_xray(file).meta if check_images else None
            if meta is not None and meta.get("format") != "dicom":
                cand.skip(file, f"not a DICOM file (its content is {meta.get('format', 'unknown').upper()})")
                continue
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except CovidCXRError as exc:
            cand.skip(file, getattr(exc, "reason", str(exc)))
            continue
        except Exception as exc:  # pydicom raises many types for non-DICOM input
            cand.skip(file, f"not a readable DICOM file: {type(exc).__name__}: {exc}"[:200])
            continue
        header = meta or {"patient_id": str(ds.get("PatientID", "") or "").strip(),
                          "view_position": str(ds.get("ViewPosition", "") or "").strip().upper()}
        record = {"image": str(file), "finding": finding, "label": label or None,
                  "source": _text(r.get("source", "")) or source}
        pid = _text(r.get("patient_id", "")) or header.get("patient_id", "")
        if not pid:
            cand.skip(file, "no patient id (empty DICOM PatientID and no patient_id column)")
            continue
        record["patient_id"] = pid if ":" in pid else f"{_prefix_for(record['source'])}:{pid}"
        record["view"] = _text(r.get("view", "")) or header.get("view_position", "")
        record["sex"] = _text(r.get("sex", "")) or str(ds.get("PatientSex", "") or "").strip()
        age = _text(r.get("age", "")) or str(ds.get("PatientAge", "") or "").strip()
        m = re.match(r"^0*(\d+)Y$", age)  # DICOM age string: '045Y'
        record["age"] = m.group(1) if m else age
        record["study_date"] = header.get("study_date", "")
        records.append(record)
        cand.checked.add(str(file))
    cand.rows = _frame(records)
    return cand


# ---------------------------------------------------------------------- the shared tail
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
                data = p.read_bytes()
            except OSError as exc:
                cand.skip(p, "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file: {exc.strerror or exc}")
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
                    cand.skip(p, getattr(exc, "reason", str(exc)))
                    ok[k] = False
    return ok


def import_dataset(format: str, path: str | Path, *, out: str | Path | None = None,
                   label_map: str | Path | LabelSpace | None = None, check_images: bool = True,
                   progress: bool = True, **options) -> ImportResult:
    """Import a downloaded data set as a manifest.

    ``label_map``: YAML rules (see :mod:`covidcxr.data.labels`) over the ``finding`` / ``label``
    columns that override the default finding -> label mapping; a rule with ``class: null`` drops the
    rows it matches. ``check_images``: decode each image with ``read_xray`` (skip unreadable /
    non-frontal files); otherwise only check that files exist. ``out``: write the manifest there and
    the skipped candidates to ``<out>.skipped.csv``. ``options`` go to the importer (``source``,
    ``labels`` for ``dicom``).
    """
    if format not in IMPORTERS:
        raise ConfigError(f"unknown import format {format!r}; use one of {sorted(IMPORTERS)}")
    cand = IMPORTERS[format](Path(path), check_images=check_images, **options)
    rows = cand.rows.reset_index(drop=True)

    if label_map is not None:
        space = label_map if isinstance(label_map, LabelSpace) else read_label_space(label_map, classes=LABELS)
        mapped, decided = space.apply_rules(rows)
        for img, in zip(rows.loc[decided & pd.isna(mapped), "image"]):
            cand.skip(img, "excluded by the label map")
        rows.loc[decided, "label"] = mapped[decided]
        rows = rows[~(decided & pd.isna(mapped))].reset_index(drop=True)

    pre_skipped = rows["label"].eq("__skipped__")
    rows = rows[~pre_skipped].reset_index(drop=True)
    unlabelled = rows["label"].isna() | rows["label"].eq("")
    for img, finding in zip(rows.loc[unlabelled, "image"], rows.loc[unlabelled, "finding"]):
        cand.skip(img, f"no usable finding ({finding!r}); add a --label-map rule for it")
    rows = rows[~unlabelled].reset_index(drop=True)

    dup = rows["image"].duplicated(keep="first")
    for img in rows.loc[dup, "image"]:
        cand.skip(img, "listed more than once (kept the first row)")
    rows = rows[~dup].reset_index(drop=True)

    ok = _check_images(rows, cand, check_images=check_images, progress=progress)
    rows = rows[ok].reset_index(drop=True)
    if rows.empty:
        raise ManifestError(f"{path}: no usable image found as format {format!r} "
                            f"({len(cand.skipped)} candidate(s) skipped, e.g. "
                            f"{cand.skipped[0] if cand.skipped else 'none'})")
    manifest = Manifest(rows, root=cand.root, name=Path(out).name if out else f"{format}:{Path(path).name}")
    skipped = pd.DataFrame(cand.skipped, columns=["image", "reason"])
    result = ImportResult(manifest, skipped, list(cand.warnings))
    if out is not None:
        manifest.write(out)
        from covidcxr.files import atomic_write_bytes

        atomic_write_bytes(skipped_path(out), skipped.to_csv(index=False, lineterminator="\n").encode())
    return result


def skipped_path(out: str | Path) -> Path:
    """Where :func:`import_dataset` writes the skipped list for manifest ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".skipped.csv") if out.suffix == "" else out.with_suffix(".skipped.csv")
