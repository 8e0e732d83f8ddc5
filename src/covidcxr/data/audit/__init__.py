"""The data audit: leakage and shortcut risks of a manifest, before anyone trains on it.

:func:`audit_manifest` runs these checks and returns an :class:`AuditReport` (``.errors``,
``.warnings``, ``.tables``, ``.to_dict()``, ``.render(console)``). Rules, precisely:

``patient_overlap`` (error)
    A ``patient_id`` with images in two different (assigned) splits.
``near_duplicate`` (warning; error with ``strict=True``)
    Two images whose 256-bit perceptual hashes (``imagehash.phash``, ``hash_size=16``) differ in at most
    ``max_distance`` bits (default 24: re-encodes / resizes / crops of one image sit at 0-20, unrelated
    chest X-rays at ~100, different people of one source rarely below 44) **and** lie in different
    splits or come from different sources. Pairs inside one split and source are counted as info.
``single_label_source`` (warning)
    A source all of whose images carry one label (while the manifest has several): a model can learn
    the label from the source's look.
``label_predictable_from_source`` (warning)
    For each label, the one-vs-rest ROC AUC of a "model" that sees only an image's source (its score is
    the label's share among that source's images). ``>= source_auc_warn`` (default 0.9) means the label
    is almost entirely explained by where the image came from (on the shared data: COVID-19, whose
    sources contribute few negatives while every negative-rich source has no COVID at all).
    Reported for the whole manifest (labels with >= 10 images) and, in the table, per split.
``age_differs`` / ``age_missing_differs`` / ``paediatric_label`` / ``sex_differs`` / ``view_differs`` (warning)
    Between two labels (each with >= 10 images): medians of known ages differ by >= 15 years or their
    10-90 % ranges do not overlap; the share of images with a known age differs by >= 50 points; one
    label is >= 50 % children (< 18 y) while another is < 10 %; the share of women among known sex
    differs by >= 25 points; the view distribution (``""`` = unknown counted as a value) differs by a
    total variation distance >= 0.5.

Perceptual hashes are cached in ``covidcxr.paths.cache_dir() / "phash"`` keyed by the SHA-256 of the
file's bytes, so a re-run (or the same image under another path) is not decoded again. Before any
image is opened, a manifest whose image paths resolve outside its folder and ``$COVIDCXR_DATA_ROOT``
is refused (:meth:`~covidcxr.data.manifest.Manifest.check_paths_inside_root`) unless
``allow_outside_root=True``; unreadable-image reasons never quote file content.

Layout: :mod:`.checks` (table checks), :mod:`.duplicates` (hashes, pair search, ``near_duplicate``),
:mod:`.report` (:class:`Finding`, :class:`AuditReport`), :mod:`.render` (console tables, figure); this
module runs them (:func:`audit_manifest`, :func:`audit_file`) and re-exports their public names.
"""

from __future__ import annotations

from pathlib import Path

from covidcxr.data.audit.checks import (  # noqa: F401  (public names of covidcxr.data.audit)
    MIN_LABEL_IMAGES, check_demographics, check_patient_overlap, check_source_confounding, check_synthetic,
    demographics_tables,
    source_label_table, source_only_auc,
)
from covidcxr.data.audit.duplicates import (  # noqa: F401
    DEFAULT_MAX_DISTANCE, HASH_SIZE, HASH_VERSION, HashCache, check_near_duplicates, find_near_duplicates,
    hamming_pairs, perceptual_hashes,
)
from covidcxr.data.audit.report import AuditReport, Finding  # noqa: F401
from covidcxr.data.manifest import Manifest
from covidcxr.errors import CovidCXRError


def audit_manifest(manifest: Manifest, *, strict: bool = False, max_distance: int = DEFAULT_MAX_DISTANCE,
                   duplicates: bool = True, source_auc_warn: float = 0.9, use_cache: bool = True,
                   progress: bool = True, allow_outside_root: bool = False) -> AuditReport:
    """Run every check on ``manifest`` (see the module docstring for the exact rules).

    With ``duplicates`` the images are read, so first every path must resolve inside the manifest's
    folder or ``$COVIDCXR_DATA_ROOT`` (:class:`~covidcxr.errors.ManifestError` naming the row
    otherwise) unless ``allow_outside_root``."""
    import time

    if not 0 <= max_distance <= HASH_SIZE * HASH_SIZE:
        raise CovidCXRError(f"max_distance={max_distance}: must be between 0 and {HASH_SIZE * HASH_SIZE} bits")
    table = manifest.table
    report = AuditReport(manifest.name, len(table), int(table["patient_id"].nunique()),
                         {"strict": strict, "max_distance": max_distance, "duplicates": duplicates,
                          "source_auc_warn": source_auc_warn, "hash": f"imagehash.phash hash_size={HASH_SIZE}",
                          "manifest_sha256": manifest.sha256()})
    t0 = time.perf_counter()
    report.findings += check_patient_overlap(table)
    report.findings += check_synthetic(table)
    if duplicates:
        if not allow_outside_root:
            manifest.check_paths_inside_root()
        pairs, unreadable = find_near_duplicates(manifest, max_distance=max_distance, use_cache=use_cache, progress=progress)
        report.duplicates, report.unreadable = pairs, unreadable
        report.findings += check_near_duplicates(pairs, strict=strict, max_distance=max_distance)
        if unreadable:
            report.findings.append(Finding("unreadable_image", "error" if strict else "warning",
                                           f"{len(unreadable)} image(s) could not be read, e.g. {unreadable[0]['image']}: "
                                           f"{unreadable[0]['reason']}", {"images": len(unreadable)}))
    t1 = time.perf_counter()
    report.tables["source_x_label"] = source_label_table(table)
    findings, auc = check_source_confounding(table, source_auc_warn=source_auc_warn)
    report.findings += findings
    report.tables["source_only_auc"] = auc
    demo = demographics_tables(table)
    report.tables.update(demo)
    report.findings += check_demographics(table, demo)
    report.seconds = {"duplicates": round(t1 - t0, 3), "tables": round(time.perf_counter() - t1, 3)}
    return report


def audit_file(manifest_path: str | Path, *, json_out: str | Path | None = None, plot_out: str | Path | None = None,
               **kwargs) -> AuditReport:
    """Read a manifest file, audit it and (optionally) write the JSON report and the figure."""
    manifest = Manifest.read(manifest_path)
    report = audit_manifest(manifest, **kwargs)
    if json_out is not None:
        report.write_json(json_out)
    if plot_out is not None:
        report.plot(plot_out, manifest.table)
    return report
