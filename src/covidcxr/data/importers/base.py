"""What every importer shares: the result types, the registry, the default finding -> label mapping,
the frontal-view rule and small helpers. The formats are in :mod:`covidcxr.data.importers.formats`,
the shared checks after them in :func:`covidcxr.data.importers.import_dataset`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from covidcxr.data.io import NON_FRONTAL_VIEWS
from covidcxr.data.manifest import Manifest, source_short_name
from covidcxr.errors import ConfigError, ImageReadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}

#: Source spellings of a view that are not DICOM ViewPosition codes, mapped to one that is; the
#: decision itself is the reader's table :data:`covidcxr.data.io.NON_FRONTAL_VIEWS`.
VIEW_SPELLINGS = {"L": "LATERAL"}  # ieee8023 metadata writes "L" for a lateral view

#: Short names (patient-id prefixes) of well-known sources, by repository / folder / COVIDx source name.
KNOWN_PREFIXES = {
    "covid-chestxray-dataset": "ieee8023", "cohen": "ieee8023",
    "figure1-covid-chestxray-dataset": "figure1", "fig1": "figure1",
    "actualmed-covid-chestxray-dataset": "actualmed", "actmed": "actualmed",
    "chest_xray": "kermany", "rsna": "rsna", "sirm": "sirm", "ricord": "ricord", "bimcv": "bimcv",
    "stonybrook": "stonybrook",
}

#: Options :func:`~covidcxr.data.importers.import_dataset` itself handles; an importer that lists one
#: of them in its signature gets it passed too (e.g. ``dicom`` reads files itself).
SHARED_OPTIONS = ("check_images", "allow_outside_root")


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
    """What an importer found before the shared checks: rows (``image`` absolute) and early skips.

    An optional ``__origin__`` column says where a row came from (``metadata.csv row 4``); errors name it."""

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
    """Decorator: register ``fn(path: Path, *, option=default, ...) -> Candidates`` as import format ``name``.

    Options are listed explicitly (no ``**kwargs``): an option a format does not take is an error
    (:func:`importer_options`), never silently ignored."""
    def deco(fn: Importer) -> Importer:
        params = list(inspect.signature(fn).parameters.values())
        if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params) or not params:
            raise TypeError(f"importer {name!r}: take the path and list every option by name (no *args / **kwargs)")
        IMPORTERS[name] = fn
        return fn
    return deco


def importer_options(fn: Importer) -> list[str]:
    """The options (keyword parameters after the path) an importer takes."""
    return list(inspect.signature(fn).parameters)[1:]


def check_options(format: str, fn: Importer, options: dict) -> None:
    """Raise :class:`ConfigError` for an option ``format``'s importer does not take."""
    takes = [o for o in importer_options(fn) if o not in SHARED_OPTIONS]
    unknown = [k for k in options if k not in takes]
    if unknown:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unknown)
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in takes) or "none besides the shared ones"
        raise ConfigError(f"importer {format!r} does not take option {flags} (options it takes: {allowed}; "
                          "every format takes --label-map, --check-images/--no-check-images, --allow-outside-root)")


# ---------------------------------------------------------------------- views
def view_code(view) -> str:
    """A source's view string as a DICOM ViewPosition-style code: ``' ap  supine'`` -> ``'AP SUPINE'``,
    ``'L'`` -> ``'LATERAL'`` (:data:`VIEW_SPELLINGS`)."""
    code = re.sub(r"[\s_]+", " ", _text(view)).upper()
    return VIEW_SPELLINGS.get(code, code)


def non_frontal_kind(view) -> str | None:
    """``'lateral'`` / ``'oblique'`` if the view is not frontal by the reader's rule
    (:data:`covidcxr.data.io.NON_FRONTAL_VIEWS`, the one ``read_xray`` applies to DICOM headers), else ``None``."""
    return NON_FRONTAL_VIEWS.get(view_code(view))


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
def reason_without_content(reason: str) -> str:
    """A read error's reason with any quoted file content removed (the reader names a text file's
    first characters and an unknown format's first bytes; a skip list must not repeat them)."""
    reason = re.split(r"\s*\(it starts with", str(reason), maxsplit=1)[0]
    return re.sub(r"\s*\(first bytes [0-9a-fA-F ]*\)", "", reason)[:300]


def read_image_bytes(path) -> bytes:
    """A candidate image's bytes, or :class:`~covidcxr.errors.ImageReadError` with the reason ("file not
    found", a folder / FIFO / device never opened, ...). Uses the reader's ``read_file_bytes`` (the one
    safe file read of covidcxr) where it exists; the importers and the audit read files only through here."""
    try:
        from covidcxr.data.io import read_file_bytes
    except ImportError:  # a reader without it: the same checks, simpler
        p = Path(path)
        if p.exists() and not p.is_file():
            raise ImageReadError(p, "not a regular file (a folder, pipe or device); not opened") from None
        try:
            return p.read_bytes()
        except OSError as exc:
            reason = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file: {exc.strerror or exc}"
            raise ImageReadError(p, reason) from None
    return read_file_bytes(path)


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
