"""Manifest contract and label spaces, on the real shared manifest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr.data.labels import get_label_space
from covidcxr.data.manifest import REQUIRED_COLUMNS, Manifest, parse_age
from covidcxr.errors import ConfigError, ManifestError


def _small(shared_manifest, n=8) -> pd.DataFrame:
    return shared_manifest.table.groupby("source", sort=True).head(2).head(n).copy()


def test_shared_manifest_reads_with_readme_counts(shared_manifest, data_root):
    t = shared_manifest.table
    assert len(shared_manifest) == 3495
    assert list(t.columns[:len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    assert t["label"].value_counts().to_dict() == {"normal": 1639, "pneumonia": 1479, "covid": 370, "other": 7}
    assert t["patient_id"].nunique() == 2764
    assert (t["split"] == "").all()  # the shared file has no split yet
    assert {"finding", "license", "notes", "split_group"} <= set(t.columns)  # extras kept
    paths = shared_manifest.image_paths()
    assert paths[0].is_absolute() and paths[0].is_file() and paths[0].parent.parent.parent.parent == data_root
    # Figure1 age ranges keep their raw string and get a numeric lower bound.
    plus = t[t["age"].str.endswith("+")]
    assert len(plus) >= 1 and (plus["age_years"] == plus["age"].str.rstrip("+").astype(float)).all()
    assert t.loc[t["age"] == "", "age_years"].isna().all()
    assert t["offset_days"].dtype == float


def test_parse_age_forms():
    assert parse_age("33") == 33 and parse_age("50+") == 50 and parse_age("40-50") == 45
    assert parse_age("early 40s") == 42 and np.isnan(parse_age("")) and np.isnan(parse_age("adult"))


def test_write_read_round_trip_keeps_images_valid_elsewhere(shared_manifest, tmp_path):
    small = shared_manifest.subset(mask=np.arange(len(shared_manifest)) < 20)
    out = small.write(tmp_path / "deep" / "folder" / "m.csv")
    text = out.read_text().splitlines()
    assert text[1].startswith("../")  # relative to the output folder, not to the shared data
    back = Manifest.read(out)
    assert [p.resolve() for p in back.image_paths()] == [p.resolve() for p in small.image_paths()]
    assert all(p.is_file() for p in back.image_paths())
    assert back.table.drop(columns="image").equals(small.table.drop(columns="image"))
    # Written again next to itself: byte-identical content, identical hash.
    again = Manifest.read(back.write(tmp_path / "deep" / "folder" / "m2.csv"))
    assert again.sha256() == back.sha256()


def test_sha256_tracks_content_not_column_order(shared_manifest):
    small = shared_manifest.subset(mask=np.arange(len(shared_manifest)) < 50)
    reordered = Manifest(small.table[small.table.columns[::-1]], root=small.root)
    assert reordered.sha256() == small.sha256()
    changed = small.table.copy()
    changed.loc[3, "label"] = "other" if changed.loc[3, "label"] != "other" else "normal"
    assert Manifest(changed, root=small.root).sha256() != small.sha256()


@pytest.mark.parametrize("mutate, expected", [
    (lambda t: t.assign(label=t["label"].where(t.index != 16, "Covid")), ["row 17", "'label'", "'Covid'", "covid"]),
    (lambda t: t.drop(columns=["patient_id"]), ["missing required column", "patient_id"]),
    (lambda t: t.assign(patient_id=t["patient_id"].where(t.index != 4, "")), ["row 5", "'patient_id'", "empty"]),
    (lambda t: t.assign(image=t["image"].where(t.index != 9, t["image"].iloc[2])), ["rows [3, 10]", "duplicate image path"]),
    (lambda t: t.assign(split=t["split"].where(t.index != 0, "training")), ["row 1", "'split'", "'training'"]),
    (lambda t: t.assign(offset_days=t["offset_days"].astype(object).where(t.index != 1, "two")), ["row 2", "'offset_days'", "not a number"]),
])
def test_validation_errors_name_row_and_column(shared_manifest, tmp_path, mutate, expected):
    table = mutate(shared_manifest.table.head(30).drop(columns="age_years"))
    path = tmp_path / "manifest.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ManifestError) as err:
        Manifest.read(path)
    msg = str(err.value)
    assert msg.startswith("manifest.csv")
    for part in expected:
        assert part in msg


def test_missing_manifest_file_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        Manifest.read(tmp_path / "nope.csv")


def test_subset_filter(split_manifest):
    train = split_manifest.subset("train")
    assert len(train) and set(train.table["split"]) == {"train"}
    dev = split_manifest.subset(["train", "val"])
    assert len(dev) == len(train) + len(split_manifest.subset("val"))
    nih_normal = split_manifest.filter(label="normal", source="muhammedtalo/COVID-19")
    assert len(nih_normal) == 431
    several = split_manifest.filter(label=["covid", "other"])
    assert len(several) == 377
    old = split_manifest.filter(lambda t: t["age_years"] >= 80)
    assert len(old) > 0 and (old.table["age_years"] >= 80).all()
    with pytest.raises(ManifestError, match="no column 'colour'"):
        split_manifest.filter(colour="blue")
    with pytest.raises(ManifestError, match="unknown split"):
        split_manifest.subset("holdout")


def test_concat_prefixes_bare_patient_ids_per_source(shared_manifest, tmp_path):
    base = _small(shared_manifest, 4)
    a = base.iloc[:2].assign(patient_id="7", source="hospital-a")
    b = base.iloc[2:4].assign(patient_id="7", source="hospital-b")
    merged = Manifest.concat([Manifest(a, root=shared_manifest.root), Manifest(b, root=shared_manifest.root)])
    assert sorted(merged.table["patient_id"].unique()) == ["hospital-a:7", "hospital-b:7"]
    assert all(p.is_file() for p in merged.image_paths())
    # Prefixed ids are namespaced already: the same patient in two manifests stays one patient.
    same = Manifest.concat([Manifest(base.iloc[:1], root=shared_manifest.root),
                            Manifest(base.iloc[1:2].assign(patient_id=base["patient_id"].iloc[0]), root=shared_manifest.root)])
    assert same.table["patient_id"].nunique() == 1
    with pytest.raises(ManifestError, match="duplicate image path"):
        Manifest.concat([Manifest(base, root=shared_manifest.root)] * 2)


# ---------------------------------------------------------------- label spaces
def test_builtin_label_spaces(shared_manifest):
    binary = get_label_space("binary")
    assert binary.classes == ("non-covid", "covid") and binary.positive == "covid"
    y = binary.assign(shared_manifest.table)
    assert (y == "covid").sum() == 370 and (y == "non-covid").sum() == 3495 - 370 and y.notna().all()
    three = get_label_space("3class")
    assert three.classes == ("normal", "pneumonia", "covid")
    keep, idx = three.targets(shared_manifest.table)
    assert keep.sum() == 3495 - 7 and set(np.unique(idx)) == {0, 1, 2}
    excl = three.exclusions(shared_manifest.table)
    assert excl["images"].sum() == 7 and set(excl["label"]) == {"other"}
    with pytest.raises(ConfigError, match="unknown label space"):
        get_label_space("4class")


def test_yaml_label_space_from_findings(shared_manifest, tmp_path):
    spec = tmp_path / "bv.yaml"
    spec.write_text(
        "name: bacterial-viral\nclasses: [normal, bacterial, viral, covid]\npositive: covid\nrules:\n"
        "  - {finding: '^COVID-19', class: covid}\n"
        "  - {finding: 'bacteri|streptococc|klebsiella|e\\.?coli|legionella|mycoplasma', class: bacterial}\n"
        "  - {finding: 'viral|virus|sars|influenza|varicella', class: viral}\n"
        "  - {label: normal, class: normal}\n")
    space = get_label_space(spec)
    assert space.name == "bacterial-viral" and space.positive == "covid"
    y = space.assign(shared_manifest.table)
    t = shared_manifest.table
    kermany = t["patient_id"].str.startswith("kermany:")
    # README: Kermany pneumonia = 653 bacterial + 332 viral.
    assert (y[kermany] == "bacterial").sum() == 653 and (y[kermany] == "viral").sum() == 332
    assert (y == "covid").sum() == 370 and (y == "normal").sum() == 1639
    excluded = space.exclusions(t)
    assert excluded["images"].sum() == y.isna().sum() > 0  # e.g. NIH "Pneumonia" has no subtype
    assert "other" in set(excluded["label"])


@pytest.mark.parametrize("text, message", [
    ("classes: [a, b]\nrules:\n  - {finding: '(', class: a}\n", "not a valid regular expression"),
    ("classes: [a, b]\nrules:\n  - {finding: x, class: c}\n", "not one of the classes"),
    ("classes: [a, b]\nrules:\n  - {colour: x, class: a}\n", "needs exactly one of"),
    ("classes: [a]\n", ">= 2 distinct"),
    ("klasses: [a, b]\n", "unknown key"),
])
def test_yaml_label_space_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        get_label_space(path)
    assert str(path) in str(err.value)


def test_table_values_are_normalised_without_touching_numeric_extras(shared_manifest):
    t = shared_manifest.table.head(4).drop(columns="age_years").copy()
    t["sex"] = [None, pd.NA, float("nan"), "F"]
    t["patient_id"] = [7, 7.0, "p:3", "p:4"]
    t["score"] = [0.1, 0.2, 0.3, 0.4]
    m = Manifest(t, root=shared_manifest.root)
    assert m.table["sex"].tolist() == ["", "", "", "F"]
    assert m.table["patient_id"].tolist() == ["7", "7", "p:3", "p:4"]
    assert m.table["score"].dtype == float


# ---------------------------------------------------------------- untrusted manifest files (red-team issue)
def _write_rows(path, shared_manifest, n=4, **columns):
    """A small manifest CSV at ``path`` whose images are real shared images (absolute paths)."""
    t = shared_manifest.table.head(n).drop(columns="age_years").copy()
    t["image"] = [str(p) for p in shared_manifest.image_paths()[:n]]
    for col, values in columns.items():
        t[col] = values
    t.to_csv(path, index=False)
    return t


@pytest.mark.parametrize("age", ["-5", "999", "130+", "100-130", "- 3", "200 years"])
def test_age_outside_0_to_120_names_the_row(shared_manifest, tmp_path, age):
    path = tmp_path / "manifest.csv"
    _write_rows(path, shared_manifest, age=["33", "50+", age, ""])
    with pytest.raises(ManifestError) as err:
        Manifest.read(path)
    msg = str(err.value)
    assert "row 3" in msg and "'age'" in msg and repr(age) in msg and "between 0 and 120" in msg


def test_real_age_forms_stay_valid(shared_manifest, tmp_path):
    # The shared data's forms (plain numbers, Figure1 '50+' / '67+', 'early 40s') plus DICOM-style units.
    assert shared_manifest.table["age_years"].dropna().between(0, 120).all()
    path = tmp_path / "manifest.csv"
    _write_rows(path, shared_manifest, n=8, age=["0", "120", "50+", "early 40s", "18M", "6 months", "adult", ""])
    m = Manifest.read(path)
    assert m.table["age_years"].tolist()[:6] == [0, 120, 50, 42, 1.5, 0.5]
    assert m.table["age_years"].iloc[6:].isna().all() and m.table["age"].iloc[6] == "adult"


def test_duplicated_column_is_an_error_naming_it(shared_manifest, tmp_path):
    path = tmp_path / "manifest.csv"
    _write_rows(path, shared_manifest)
    lines = path.read_text().splitlines()
    lines = [lines[0] + ",sex"] + [line + ",F" for line in lines[1:]]  # pandas would call it 'sex.1'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"column 'sex' appears more than once"):
        Manifest.read(path)


def test_nul_byte_in_a_cell_is_refused_naming_row_and_column(shared_manifest, tmp_path):
    path = tmp_path / "manifest.csv"
    _write_rows(path, shared_manifest, patient_id=["a:1", "a:2", "a:\x003", "a:4"])
    with pytest.raises(ManifestError) as err:
        Manifest.read(path)
    assert "row 3" in str(err.value) and "'patient_id'" in str(err.value) and "NUL byte" in str(err.value)


def test_formula_cells_are_neutralised_on_write_and_restored_on_read(shared_manifest, tmp_path):
    tricky = ['=HYPERLINK("http://evil","x")', "+1", "@SUM(A1)", "-5"]
    src = tmp_path / "in.csv"
    _write_rows(src, shared_manifest, patient_id=tricky, notes=["'=already quoted", "\tTAB", " =spaced", "plain"])
    m = Manifest.read(src)
    out = m.write(tmp_path / "out.csv")
    raw = pd.read_csv(out, dtype=str, keep_default_na=False)
    for col in ("patient_id", "notes"):
        assert not raw[col].str.match(r"^\s*[=+\-@\t\r]").any(), raw[col].tolist()
    assert raw["patient_id"].tolist()[0] == "'" + tricky[0] and raw["patient_id"].iloc[3] == "'-5"
    back = Manifest.read(out)
    assert back.table["patient_id"].tolist() == tricky  # exact round trip
    assert back.table["notes"].tolist() == m.table["notes"].tolist()
    assert back.sha256() == Manifest.read(back.write(tmp_path / "again.csv")).sha256()
    assert raw["offset_days"].tolist() == m.table["offset_days"].map(lambda v: "" if pd.isna(v) else f"{v:.10g}").tolist()


def test_paths_outside_the_data_root_are_refused(shared_manifest, tmp_path, monkeypatch):
    from covidcxr import paths

    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    real = shared_manifest.image_paths()[:2]
    monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path / "configured-data-root"))  # not the shared folder
    shutil.copy(real[0], folder / "images" / "a.jpg")
    (folder / "images" / "link.jpg").symlink_to(real[1])  # a symlink pointing out of the folder
    (tmp_path / "secret.txt").write_text("password")
    rows = shared_manifest.table.head(1).drop(columns="age_years")
    inside = rows.assign(image="images/a.jpg")
    pd.DataFrame(inside).to_csv(folder / "ok.csv", index=False)
    ok = Manifest.read(folder / "ok.csv")
    assert ok.image_paths(check_root=True) == ok.image_paths()
    for bad, row in [("../secret.txt", 2), (str(tmp_path / "secret.txt"), 2), ("/proc/self/environ", 2),
                     ("images/link.jpg", 2)]:
        t = pd.concat([inside, rows.assign(image=bad, patient_id="x:9")], ignore_index=True)
        t.to_csv(folder / "m.csv", index=False)
        m = Manifest.read(folder / "m.csv")  # reading the table is fine; opening its files is not
        with pytest.raises(ManifestError) as err:
            m.image_paths(check_root=True)
        assert f"m.csv row {row}" in str(err.value) and repr(bad) in str(err.value) and "allow_outside_root" in str(err.value)
    # The configured data root counts as inside: manifests written elsewhere point into it.
    monkeypatch.setenv(paths.DATA_ROOT_ENV, str(Path(os.path.realpath(real[1])).parent))
    m.check_paths_inside_root()
    assert m.image_paths(check_root=True)[1].resolve() == Path(os.path.realpath(real[1]))


def test_written_manifest_pointing_into_the_shared_data_passes_the_check(shared_manifest, tmp_path):
    small = shared_manifest.subset(mask=np.arange(len(shared_manifest)) < 10)
    back = Manifest.read(small.write(tmp_path / "runs" / "data" / "m.csv"))  # paths ../../../shared/...
    back.check_paths_inside_root()
    merged = Manifest.concat([back.subset(mask=np.arange(10) < 5), small.subset(mask=np.arange(10) >= 5)])
    assert merged.root == Path("/")  # but the parts' folders are what the check uses
    merged.check_paths_inside_root()
    evil = Manifest.concat([Manifest(small.table.head(1).assign(image="/etc/hostname"), root=tmp_path)])
    with pytest.raises(ManifestError, match="outside the data root"):
        evil.check_paths_inside_root()
