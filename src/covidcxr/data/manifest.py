"""The manifest: covidcxr's one data contract.

A :class:`Manifest` is a validated pandas table with one row per image plus the folder that
relative ``image`` paths resolve against. Every importer produces one, splits and audits read and
return one, and training records :meth:`Manifest.sha256` of the data it used.

Columns (always present after validation):

==============  =================================================================================
``image``       path of the image file, relative to :attr:`Manifest.root` (or absolute)
``label``       one of ``covid``, ``normal``, ``pneumonia``, ``other``
``patient_id``  ``<source-prefix>:<id>``; images of one person share it (splits group by it)
``source``      where the pixels came from (e.g. GitHub ``owner/name``)
``view``        ``PA``, ``AP``, ``AP Supine``, ... ; ``""`` when unknown
``sex``         as given by the source (``M`` / ``F``); ``""`` when unknown
``age``         the raw age string of the source (Figure1 has ranges like ``50+``); ``""`` when unknown
``age_years``   numeric age derived from ``age`` (``50+`` -> 50, ``40-50`` -> 45); NaN when unknown
``offset_days`` days since symptom onset / admission (float, NaN when unknown)
``split``       ``train``, ``val``, ``test``, ``external`` or ``""`` (not assigned yet)
==============  =================================================================================

Other columns (``finding``, ``license``, ``notes``, ``fold``, ...) are kept as they are. Unknown
text values are empty strings (not NaN) so that group-bys and CSV round trips keep them.

Files are untrusted input: a CSV with a column named twice, a NUL byte in a cell or an age outside
0-120 years is refused (naming the row / column); CSV files are written with
:func:`covidcxr.files.write_csv` (cells starting with ``= + - @`` are quoted so a spreadsheet does not
run them; :meth:`Manifest.read` undoes that exactly). Image paths may point anywhere, but
:meth:`Manifest.check_paths_inside_root` / ``image_paths(check_root=True)`` refuse any that resolve
(after symlinks) outside the manifest's folder and the configured data root, before a file is opened.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from covidcxr.data.validation import (  # noqa: F401  (re-exported: the manifest contract's names)
    AGE_RANGE, DERIVED_COLUMNS, LABELS, MUST_HAVE, NUMERIC_COLUMNS, OPTIONAL_TEXT, REQUIRED_COLUMNS, SPLITS,
    age_problem, outside_roots, parse_age, read_csv_table, validate_table,
)
from covidcxr.errors import ManifestError


def patient_prefix(patient_id: str) -> str:
    """The namespace of a patient id (``'kermany:person1'`` -> ``'kermany'``; ``''`` if none)."""
    head, sep, _ = str(patient_id).partition(":")
    return head if sep else ""


def source_short_name(source: str) -> str:
    """A short, id-safe name for a source: ``'owner/Repo-Name'`` -> ``'repo-name'``."""
    name = str(source).rstrip("/").split("/")[-1].strip().lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name) or "unknown"


@dataclass
class Manifest:
    """A validated image table plus the folder that relative ``image`` paths resolve against."""

    table: pd.DataFrame
    root: Path
    name: str = "manifest"  # used in error messages (usually the file name)
    #: Folders image files must lie in (:meth:`check_paths_inside_root`); ``None``: ``(root,)``.
    #: :meth:`concat` keeps its parts' folders here, since its own ``root`` may be ``/``.
    data_roots: tuple[Path, ...] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.root = Path(self.root)
        if self.data_roots is not None:
            self.data_roots = tuple(Path(r) for r in self.data_roots)
        self.table = validate_table(self.table, name=self.name)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """Read and validate a manifest CSV (or Parquet); relative paths resolve against its folder."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"{path}: manifest file not found")
        if path.suffix.lower() == ".parquet":
            try:
                table = pd.read_parquet(path)
            except (ValueError, OSError, ImportError) as exc:
                raise ManifestError(f"{path}: cannot be read as a manifest ({exc})") from exc
        else:
            from covidcxr.files import csv_unquote

            table = csv_unquote(read_csv_table(path, what="a manifest"))
        return cls(table, root=path.resolve().parent, name=path.name)

    def write(self, path: str | Path) -> Path:
        """Write the manifest (CSV, or Parquet for ``.parquet`` if pyarrow is installed).

        Image paths are rewritten relative to the output file's folder, so the written manifest
        stays valid wherever it is placed. Returns the path written.
        """
        from covidcxr.files import atomic_write_bytes, write_csv

        path = Path(path)
        out_dir = path.resolve().parent
        table = self.table.copy()
        table["image"] = [_relative_to(p, out_dir) for p in self.image_paths()]
        table = table.drop(columns=[c for c in DERIVED_COLUMNS if c in table.columns])
        if path.suffix.lower() == ".parquet":
            buf = io.BytesIO()
            try:
                table.to_parquet(buf, index=False)
            except ImportError as exc:
                raise ManifestError(f"{path}: writing Parquet needs pyarrow; write a .csv instead") from exc
            atomic_write_bytes(path, buf.getvalue())
        else:  # spreadsheet-safe: '=...' cells quoted, read() restores them
            write_csv(path, table, float_format="%.10g")
        return path

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        counts = self.table["label"].value_counts().to_dict()
        return f"Manifest({self.name!r}, {len(self)} images, {self.table['patient_id'].nunique()} patients, {counts})"

    def image_paths(self, check_root: bool = False) -> list[Path]:
        """Absolute paths of the images, in table order.

        ``check_root=True``: first :meth:`check_paths_inside_root` (raise :class:`ManifestError` if
        any image resolves outside the data root). Use it wherever the files are then opened."""
        if check_root:
            self.check_paths_inside_root()
        return [_resolve(self.root, p) for p in self.table["image"]]

    def allowed_roots(self) -> list[Path]:
        """Folders (resolved) the images may lie in: the manifest's folder (:attr:`data_roots`) and the
        configured data root (``$COVIDCXR_DATA_ROOT``, default ``../shared/data/cxr``), which is where
        manifests written elsewhere (``runs/data/split.csv``) point."""
        from covidcxr.paths import data_root

        roots = [Path(os.path.realpath(r)) for r in (self.data_roots or (self.root,))]
        return list(dict.fromkeys(roots + [Path(os.path.realpath(data_root()))]))

    def check_paths_inside_root(self) -> None:
        """Raise :class:`ManifestError` naming the first row and path whose image resolves (after
        symlinks, ``..``) outside :meth:`allowed_roots`, e.g. ``../../etc/passwd`` or ``/proc/self/environ``.

        Call it before opening a manifest's files when the manifest may come from someone else;
        opening them anyway is the caller's explicit choice (``allow_outside_root=True`` in covidcxr's
        functions, ``--allow-outside-root`` on the command line). Nothing is opened here."""
        roots = self.allowed_roots()
        paths = [_resolve(self.root, p) for p in self.table["image"]]
        bad = outside_roots(paths, roots)
        if bad:
            k = bad[0]
            raise ManifestError(f"{self.name} row {k + 1}, column 'image': {self.table['image'].iloc[k]!r} resolves to "
                                f"{os.path.realpath(paths[k])}, outside the data root ({_roots_text(roots)}); "
                                f"{len(bad)} row(s) in all. Refused before opening it: keep images inside the "
                                "manifest's folder or $COVIDCXR_DATA_ROOT, or pass allow_outside_root=True "
                                "(CLI: --allow-outside-root) if these files are meant to be read")

    def replace(self, table: pd.DataFrame) -> "Manifest":
        """A new manifest with the same root and name over another (validated) table."""
        return Manifest(table.reset_index(drop=True), root=self.root, name=self.name, data_roots=self.data_roots)

    def subset(self, split: str | Sequence[str] | None = None, mask=None) -> "Manifest":
        """Rows of one or several splits (``subset("train")``, ``subset(["train", "val"])``) and/or a
        boolean mask over the rows."""
        keep = np.ones(len(self), dtype=bool)
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            unknown = sorted(set(wanted) - set(SPLITS) - {""})
            if unknown:
                raise ManifestError(f"{self.name}: unknown split(s) {unknown}; use one of {list(SPLITS)}")
            keep &= self.table["split"].isin(wanted).to_numpy()
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (len(self),):
                raise ManifestError(f"{self.name}: mask has {mask.shape} entries, manifest has {len(self)} rows")
            keep &= mask
        return self.replace(self.table[keep])

    def filter(self, predicate: Callable[[pd.DataFrame], Iterable[bool]] | None = None, **equals) -> "Manifest":
        """Rows where every ``column=value`` holds (a list/tuple/set value means "any of") and, if
        given, ``predicate(table)`` is true: ``m.filter(label=["normal", "pneumonia"], sex="F")``."""
        keep = np.ones(len(self), dtype=bool)
        for column, value in equals.items():
            if column not in self.table.columns:
                raise ManifestError(f"{self.name}: no column {column!r} to filter on; columns: {list(self.table.columns)}")
            values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
            keep &= self.table[column].isin(values).to_numpy()
        if predicate is not None:
            keep &= np.asarray(predicate(self.table), dtype=bool)
        return self.replace(self.table[keep])

    @classmethod
    def concat(cls, manifests: Sequence["Manifest"], root: str | Path | None = None, name: str = "manifest") -> "Manifest":
        """Merge manifests (e.g. several imported sources) into one.

        Image paths are made absolute (or relative to ``root`` if given). Patient ids without a
        ``prefix:`` namespace get their source's short name as prefix, so ``'1'`` of one source can
        never collide with ``'1'`` of another; ids that already carry a prefix are kept, so the same
        patient in two manifests of the same source stays one patient.
        """
        if not manifests:
            raise ManifestError("concat needs at least one manifest")
        root = Path(root).resolve() if root is not None else None
        parts = []
        data_roots = list(dict.fromkeys(r for m in manifests for r in (m.data_roots or (m.root,))))
        for m in manifests:
            t = m.table.copy()
            t["image"] = [str(p) if root is None else _relative_to(p, root) for p in m.image_paths()]
            t["patient_id"] = prefix_patient_ids(t["patient_id"], t["source"])
            parts.append(t)
        table = pd.concat(parts, ignore_index=True, sort=False)
        for col in table.columns:  # columns only some parts had: unknown -> "" (text) / NaN (numbers)
            if col not in NUMERIC_COLUMNS and col != "fold" and not pd.api.types.is_numeric_dtype(table[col]):
                table[col] = table[col].fillna("")
        if "fold" in table.columns:
            table["fold"] = table["fold"].fillna(-1)
        return cls(table, root=root or Path("/"), name=name, data_roots=tuple(data_roots))

    def sha256(self) -> str:
        """Content hash of the table (columns in a canonical order, image paths as stored).

        Identical for the same data regardless of column order; changes when any value, row or
        row order changes. Training records it so a run names exactly the data it saw.
        """
        t = self.table.drop(columns=[c for c in DERIVED_COLUMNS if c in self.table.columns])
        cols = [c for c in REQUIRED_COLUMNS] + sorted(c for c in t.columns if c not in REQUIRED_COLUMNS)
        data = t[cols].to_csv(index=False, lineterminator="\n", float_format="%.10g")
        return hashlib.sha256(data.encode("utf-8")).hexdigest()

    def counts(self, by: Sequence[str] = ("source", "label")) -> pd.DataFrame:
        """Image counts as a cross table (rows: all but the last column in ``by``)."""
        by = list(by)
        return self.table.groupby(by[:-1])[by[-1]].value_counts().unstack(fill_value=0) if len(by) > 1 \
            else self.table[by[0]].value_counts().to_frame("images")


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def prefix_patient_ids(patient_ids: pd.Series, sources: pd.Series) -> pd.Series:
    """Give ids without a ``prefix:`` namespace their source's short name as prefix."""
    ids = patient_ids.astype(str)
    bare = ~ids.str.contains(":", regex=False)
    out = ids.copy()
    out[bare] = [f"{source_short_name(s)}:{i}" for s, i in zip(sources[bare], ids[bare])]
    return out


def _resolve(root: Path, image: str) -> Path:
    p = Path(image)
    return p if p.is_absolute() else root / p


def _relative_to(path: Path, folder: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # different drive (Windows): keep it absolute
        return path.as_posix()
