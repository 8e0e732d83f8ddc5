"""covidcxr.data is the bottom layer: it imports nothing from the layers built on it, and its manifest
/ import / audit modules stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import covidcxr.data

DATA = Path(covidcxr.data.__file__).parent
HIGHER_LAYERS = ("covidcxr.models", "covidcxr.training", "covidcxr.evaluation", "covidcxr.explain", "covidcxr.serving")


def test_data_imports_no_higher_layer():
    offenders = []
    for path in sorted(DATA.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(DATA)}: {n}" for n in names if n.startswith(HIGHER_LAYERS)]
    assert not offenders


def test_manifest_importer_and_audit_modules_under_400_lines():
    files = [DATA / "manifest.py", DATA / "validation.py", DATA / "splits.py", DATA / "labels.py",
             *sorted((DATA / "importers").glob("*.py")), *sorted((DATA / "audit").glob("*.py"))]
    sizes = {f.relative_to(DATA).as_posix(): len(f.read_text().splitlines()) for f in files}
    assert {"audit/checks.py", "audit/duplicates.py", "audit/render.py", "importers/formats.py"} <= set(sizes)
    assert max(sizes.values()) <= 400, sizes


def test_audit_package_keeps_its_public_names():
    import covidcxr.data.audit as audit

    for name in ("audit_manifest", "audit_file", "AuditReport", "Finding", "HASH_VERSION", "hamming_pairs",
                 "source_only_auc", "perceptual_hashes", "find_near_duplicates", "check_patient_overlap"):
        assert hasattr(audit, name), name


def test_importers_use_the_readers_frontal_view_table():
    from covidcxr.data import importers, io

    assert importers.non_frontal_kind("LL") == io.NON_FRONTAL_VIEWS["LL"] == "lateral"
    assert all(importers.non_frontal_kind(v) == k for v, k in io.NON_FRONTAL_VIEWS.items())
    assert importers.non_frontal_kind("L") == "lateral" and importers.non_frontal_kind(" rao ") == "oblique"
    assert all(importers.non_frontal_kind(v) is None for v in ("PA", "AP", "AP Supine", "AP erect", ""))
    assert not hasattr(importers, "FRONTAL_VIEWS")  # no second list
