"""Importers, each on a small layout written here from real shared images (and the real DICOM)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.data.importers import IMPORTERS, import_dataset, label_from_finding, skipped_path
from covidcxr.data.manifest import Manifest
from covidcxr.errors import ConfigError, ManifestError


def _images(data_root: Path, folder: str, n: int) -> list[Path]:
    return sorted((data_root / "images" / folder).glob("*.jpg"))[:n]


def test_registry_has_every_documented_format():
    assert {"covidcxr", "ieee8023", "folders", "covidx", "dicom"} <= set(IMPORTERS)
    with pytest.raises(ConfigError, match="unknown import format 'kaggle'"):
        import_dataset("kaggle", ".")


@pytest.mark.parametrize("finding, label", [
    ("COVID-19", "covid"), ("Pneumonia/Viral/COVID-19", "covid"), ("COVID-19, ARDS", "covid"),
    ("No Finding", "normal"), ("Pneumonia/Bacterial/Streptococcus", "pneumonia"), ("SARS", "pneumonia"),
    ("Pneumocystis", "pneumonia"), ("E.Coli", "pneumonia"), ("Pneumonia/Lipoid", "other"), ("ARDS", "other"),
    ("Tuberculosis", "other"), ("todo", None), ("", None),
])
def test_default_finding_mapping_follows_the_data_readme(finding, label):
    assert label_from_finding(finding) == label


def test_covidcxr_manifest_import_skips_bad_files(shared_manifest, tmp_path):
    rows = shared_manifest.table.groupby("source").head(2).drop(columns="age_years").copy()
    rows["image"] = [str(p) for p in Manifest(rows, root=shared_manifest.root).image_paths()]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    extra = pd.DataFrame([rows.iloc[0].to_dict() | {"image": str(bad), "patient_id": "x:1"},
                          rows.iloc[0].to_dict() | {"image": str(tmp_path / "gone.jpg"), "patient_id": "x:2"}])
    src = tmp_path / "in.csv"
    pd.concat([rows, extra]).to_csv(src, index=False)
    out = tmp_path / "out" / "manifest.csv"
    result = import_dataset("covidcxr", src, out=out, progress=False)
    assert len(result.manifest) == len(rows) == 10
    reasons = dict(zip(result.skipped["image"], result.skipped["reason"]))
    assert reasons[str(tmp_path / "gone.jpg")] == "file not found"
    assert "bad.jpg" in "".join(reasons) and len(reasons) == 2
    back = Manifest.read(out)
    assert all(p.is_file() for p in back.image_paths()) and len(back) == 10
    assert pd.read_csv(skipped_path(out)).shape[0] == 2 and skipped_path(out).name == "manifest.skipped.csv"


def _ieee_layout(data_root: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "covid-chestxray-dataset"
    (repo / "images").mkdir(parents=True)
    covid = _images(data_root, "ieee8023/covid", 3)
    normal = _images(data_root, "ieee8023/normal", 1)
    for p in covid + normal:
        shutil.copy(p, repo / "images" / p.name)
    rows = [
        dict(patientid="1", offset="0", sex="M", age="60", finding="Pneumonia/Viral/COVID-19", view="PA", modality="X-ray", folder="images", filename=covid[0].name),
        dict(patientid="1", offset="4", sex="M", age="60", finding="Pneumonia/Viral/COVID-19", view="AP Supine", modality="X-ray", folder="images", filename=covid[1].name),
        dict(patientid="2", offset="about a week", sex="F", age="", finding="No Finding", view="PA", modality="X-ray", folder="images", filename=normal[0].name),
        dict(patientid="3", offset="", sex="F", age="50", finding="COVID-19", view="L", modality="X-ray", folder="images", filename=covid[2].name),
        dict(patientid="4", offset="", sex="", age="", finding="COVID-19", view="Axial", modality="CT", folder="volumes", filename="ct.nii.gz"),
        dict(patientid="5", offset="", sex="", age="", finding="todo", view="PA", modality="X-ray", folder="images", filename=covid[2].name),
        dict(patientid="6", offset="", sex="", age="", finding="COVID-19", view="PA", modality="X-ray", folder="images", filename="missing.jpg"),
    ]
    pd.DataFrame(rows).to_csv(repo / "metadata.csv", index=False)
    return repo


def test_ieee8023_layout_keeps_frontal_xrays_and_reports_the_rest(data_root, tmp_path):
    repo = _ieee_layout(data_root, tmp_path)
    result = import_dataset("ieee8023", repo, progress=False)
    t = result.manifest.table
    assert t["label"].tolist() == ["covid", "covid", "normal"]
    assert t["patient_id"].tolist() == ["ieee8023:1", "ieee8023:1", "ieee8023:2"]
    assert t["offset_days"].tolist()[:2] == [0.0, 4.0] and t["view"].tolist() == ["PA", "AP Supine", "PA"]
    assert pd.isna(t["offset_days"].iloc[2])  # free text in 'offset' is unknown, not an import failure
    reasons = result.skipped["reason"].tolist()
    assert any("view L" in r for r in reasons) and any("modality CT" in r for r in reasons)
    assert any("no usable finding ('todo')" in r for r in reasons) and "file not found" in reasons
    assert len(result.skipped) == 4  # every dropped metadata row is accounted for
    summary = result.skipped_summary()
    assert summary["images"].sum() == 4


def test_label_map_overrides_default_mapping(data_root, tmp_path):
    repo = _ieee_layout(data_root, tmp_path)
    label_map = tmp_path / "map.yaml"
    label_map.write_text("rules:\n  - {finding_exact: todo, class: other}\n  - {finding: 'no finding', class: null}\n")
    result = import_dataset("ieee8023", repo, label_map=label_map, progress=False)
    t = result.manifest.table
    assert "normal" not in set(t["label"])  # excluded by the map
    assert t.loc[t["patient_id"] == "ieee8023:5", "label"].tolist() == ["other"]
    assert "excluded by the label map" in result.skipped["reason"].tolist()
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {finding: x, class: flu}\n")
    with pytest.raises(ConfigError, match="not one of the classes"):
        import_dataset("ieee8023", repo, label_map=bad, progress=False)


def test_figure1_layout_without_filename_column(data_root, tmp_path):
    repo = tmp_path / "Figure1-COVID-chestxray-dataset"
    (repo / "images").mkdir(parents=True)
    src = _images(data_root, "figure1/covid", 2)
    shutil.copy(src[0], repo / "images" / "COVID-00001.jpg")
    Image.open(src[1]).save(repo / "images" / "COVID-00002.png")
    pd.DataFrame([dict(patientid="COVID-00001", age="50+", sex="M", finding="COVID-19", view=""),
                  dict(patientid="COVID-00002", age="", sex="", finding="No finding", view="")]) \
        .to_csv(repo / "metadata.csv", index=False)
    t = import_dataset("ieee8023", repo, progress=False).manifest.table
    assert t["patient_id"].tolist() == ["figure1:COVID-00001", "figure1:COVID-00002"]
    assert t["label"].tolist() == ["covid", "normal"] and t["age_years"].iloc[0] == 50
    assert t["image"].iloc[1].endswith("COVID-00002.png")


def test_kaggle_chest_xray_folders_group_kermany_patients(data_root, tmp_path):
    root = tmp_path / "chest_xray"
    normal = _images(data_root, "kermany/normal", 2)
    pneu = sorted((data_root / "images" / "kermany" / "pneumonia").glob("person1*_*.jpg"))[:2]
    (root / "train" / "NORMAL").mkdir(parents=True)
    (root / "test" / "PNEUMONIA").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "NORMAL").mkdir(parents=True)
    shutil.copy(normal[0], root / "train" / "NORMAL" / "IM-0117-0001.jpeg")
    shutil.copy(normal[1], root / "train" / "NORMAL" / "NORMAL2-IM-0652-0001.jpeg")
    shutil.copy(pneu[0], root / "test" / "PNEUMONIA" / "person12_bacteria_46.jpeg")
    shutil.copy(pneu[1], root / "test" / "PNEUMONIA" / "person12_bacteria_47.jpeg")
    shutil.copy(normal[0], root / "__MACOSX" / "train" / "NORMAL" / "._IM-0117-0001.jpeg")
    (root / "train" / "NORMAL" / "notes.docx").write_text("x")
    result = import_dataset("folders", root, progress=False)
    t = result.manifest.table.sort_values("image")
    assert sorted(t["patient_id"]) == ["kermany:IM-0117", "kermany:NORMAL2-IM-0652", "kermany:person12", "kermany:person12"]
    assert t.set_index("patient_id").loc["kermany:person12", "finding"].tolist() == ["Pneumonia/Bacterial"] * 2
    assert set(t["original_split"]) == {"train", "test"} and not result.warnings
    assert result.skipped["reason"].str.contains("not an image file").sum() == 1


def test_covid19_radiography_database_folders_warn_about_patient_ids(data_root, tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"
    layout = {"COVID": "ieee8023/covid", "Normal": "rsna/normal", "Viral Pneumonia": "kermany/pneumonia",
              "Lung_Opacity": "nih/pneumonia"}
    for folder, src in layout.items():
        (root / folder / "images").mkdir(parents=True)
        (root / folder / "masks").mkdir()
        for k, p in enumerate(_images(data_root, src, 2), start=1):
            Image.open(p).convert("L").resize((128, 128)).save(root / folder / "images" / f"{folder}-{k}.png")
            Image.new("L", (128, 128)).save(root / folder / "masks" / f"{folder}-{k}.png")
    result = import_dataset("folders", root, progress=False)
    t = result.manifest.table
    assert len(t) == 8  # masks ignored
    assert t["label"].value_counts().to_dict() == {"covid": 2, "normal": 2, "pneumonia": 2, "other": 2}
    assert t["patient_id"].nunique() == 8 and t["patient_id"].str.startswith("covid-19_radiography_dataset:").all()
    assert len(result.warnings) == 1 and "grouping" in result.warnings[0]


def test_covidx_label_files(data_root, tmp_path):
    root = tmp_path / "covidx"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    covid, normal = _images(data_root, "ieee8023/covid", 1)[0], _images(data_root, "nih/normal", 2)
    shutil.copy(covid, root / "train" / "a.jpg")
    shutil.copy(normal[0], root / "train" / "b.jpg")
    shutil.copy(normal[1], root / "test" / "c.jpg")
    (root / "train.txt").write_text("17 a.jpg COVID-19 cohen\n00001 b.jpg normal rsna\n\n99 d.jpg negative bimcv\nbroken\n")
    (root / "test.txt").write_text("00001 c.jpg pneumonia rsna\n")
    result = import_dataset("covidx", root, progress=False)
    t = result.manifest.table
    t = t.iloc[t["image"].map(lambda p: Path(p).name).argsort()]  # a, b, c
    assert t["patient_id"].tolist() == ["ieee8023:17", "rsna:00001", "rsna:00001"]
    assert t["label"].tolist() == ["covid", "normal", "pneumonia"]
    assert t["original_split"].tolist() == ["train", "train", "test"]
    reasons = " | ".join(result.skipped["reason"])
    assert "'negative'" in reasons and "malformed line" in reasons and len(result.skipped) == 2
    # A label map can say what COVIDx 'negative' means.
    label_map = tmp_path / "covidx.yaml"
    label_map.write_text("rules:\n  - {finding_exact: negative, class: normal}\n")
    mapped = import_dataset("covidx", root, label_map=label_map, check_images=False, progress=False)
    assert len(mapped.manifest) == 3 and "file not found" in mapped.skipped["reason"].tolist()  # d.jpg is absent


def test_dicom_folder_with_labels_csv(data_root, tmp_path):
    import pydicom

    root = tmp_path / "dicoms"
    root.mkdir()
    shutil.copy(data_root / "dicom" / "RG1_J2KI.dcm", root / "chest.dcm")
    lateral = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm")
    lateral.ViewPosition = "LL"
    lateral.PatientID = "LAT-1"
    lateral.save_as(root / "lateral.dcm")
    (root / "fake.dcm").write_text("not dicom at all")
    shutil.copy(_images(data_root, "nih/normal", 1)[0], root / "photo.dcm")  # a JPEG named .dcm
    pd.DataFrame({"file": ["chest.dcm", "lateral.dcm", "fake.dcm", "absent.dcm", "photo.dcm"],
                  "label": ["normal", "covid", "covid", "covid", "normal"]}).to_csv(root / "labels.csv", index=False)
    result = import_dataset("dicom", root, progress=False)
    t = result.manifest.table
    assert len(t) == 1 and t["label"].iloc[0] == "normal" and t["view"].iloc[0] == "PA"
    header_id = str(pydicom.dcmread(root / "chest.dcm", stop_before_pixels=True).PatientID)
    assert header_id and t["patient_id"].iloc[0] == f"dicoms:{header_id}"
    reasons = {Path(p).name: r for p, r in zip(result.skipped["image"], result.skipped["reason"])}
    assert set(reasons) == {"lateral.dcm", "fake.dcm", "absent.dcm", "photo.dcm"}
    assert "lateral" in reasons["lateral.dcm"] and "ViewPosition is LL" in reasons["lateral.dcm"]
    assert reasons["absent.dcm"] == "file not found" and "not a DICOM" in reasons["photo.dcm"]
    with pytest.raises(ConfigError, match="labels CSV not found"):
        import_dataset("dicom", root, labels=root / "nope.csv", progress=False)


def test_import_cli_prints_summary_and_writes_files(data_root, tmp_path):
    repo = _ieee_layout(data_root, tmp_path)
    out = tmp_path / "m.csv"
    result = CliRunner().invoke(app, ["data", "import", "ieee8023", str(repo), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped 4 candidate(s)" in result.output and "view L: not frontal" in result.output
    assert len(Manifest.read(out)) == 3 and skipped_path(out).is_file()


def test_byte_identical_copies_are_skipped_with_the_kept_file_named(data_root, tmp_path):
    root = tmp_path / "chest_xray"
    src = _images(data_root, "kermany/normal", 2)
    for top in (root, root / "chest_xray"):  # the Kaggle zip nests a second full copy
        (top / "train" / "NORMAL").mkdir(parents=True)
        for p in src:
            shutil.copy(p, top / "train" / "NORMAL" / p.name.replace(".jpg", ".jpeg"))
    result = import_dataset("folders", root, progress=False)
    assert len(result.manifest) == 2
    assert len(result.skipped) == 2 and result.skipped["reason"].str.startswith("identical file content to").all()


# ---------------------------------------------------------------- hardening (red-team issue)
def _minimal_layout(data_root: Path, tmp_path: Path, n: int = 3) -> Path:
    """A data folder with ``n`` real shared images (copied) and the minimal manifest columns."""
    folder = tmp_path / "minimal"
    (folder / "images").mkdir(parents=True)
    src = _images(data_root, "nih/normal", n - 1) + _images(data_root, "ieee8023/covid", 1)
    rows = []
    for k, p in enumerate(src):
        shutil.copy(p, folder / "images" / f"{k}.jpg")
        rows.append({"image": f"images/{k}.jpg", "label": "covid" if "ieee8023" in str(p) else "normal",
                     "patient_id": f"t:{k}", "source": "test"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder


def test_minimal_manifest_without_finding_column_imports(data_root, tmp_path):
    folder = _minimal_layout(data_root, tmp_path)
    assert pd.read_csv(folder / "manifest.csv").columns.tolist() == ["image", "label", "patient_id", "source"]
    out = tmp_path / "out" / "m.csv"
    result = import_dataset("covidcxr", folder / "manifest.csv", out=out, progress=False)
    assert len(result.manifest) == 3 and result.skipped.empty
    assert "finding" not in result.manifest.table.columns
    label_map = tmp_path / "map.yaml"  # a finding rule on a manifest without findings matches nothing
    label_map.write_text("rules:\n  - {finding: covid, class: other}\n  - {label: normal, class: pneumonia}\n")
    mapped = import_dataset("covidcxr", folder, label_map=label_map, progress=False).manifest.table
    assert sorted(mapped["label"]) == ["covid", "pneumonia", "pneumonia"]
    cli = CliRunner().invoke(app, ["data", "import", "covidcxr", str(folder / "manifest.csv"), "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    assert len(Manifest.read(out)) == 3


def test_an_option_the_importer_does_not_take_is_an_error(data_root, tmp_path, capsys, monkeypatch):
    import sys

    from covidcxr import cli
    from covidcxr.data.importers import register_importer

    folder = _minimal_layout(data_root, tmp_path, n=2)
    with pytest.raises(ConfigError, match="importer 'covidcxr' does not take option --source"):
        import_dataset("covidcxr", folder, source="mine", progress=False)
    with pytest.raises(ConfigError, match="importer 'ieee8023' does not take option --labels"):
        import_dataset("ieee8023", folder, labels="x.csv", progress=False)
    monkeypatch.setattr(sys, "argv", ["covidcxr", "data", "import", "folders", str(folder), "--out",
                                      str(tmp_path / "o.csv"), "--labels", str(folder / "manifest.csv")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "importer 'folders' does not take option --labels" in err and "Traceback" not in err
    assert not (tmp_path / "o.csv").exists()
    with pytest.raises(TypeError, match="no \\*args / \\*\\*kwargs"):
        register_importer("sloppy")(lambda path, **_: None)
    assert "sloppy" not in IMPORTERS


def test_import_refuses_images_outside_the_data_root(data_root, tmp_path):
    folder = _minimal_layout(data_root, tmp_path, n=2)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:TOPSECRET-PASSWORD\n")
    ok = pd.read_csv(folder / "manifest.csv")
    evil = pd.DataFrame([{"image": "../secret.txt", "label": "covid", "patient_id": "e:1", "source": "e"},
                         {"image": "/etc/passwd", "label": "covid", "patient_id": "e:2", "source": "e"},
                         {"image": "/proc/self/environ", "label": "covid", "patient_id": "e:3", "source": "e"}])
    pd.concat([ok, evil]).to_csv(folder / "evil.csv", index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(ManifestError) as err:
        import_dataset("covidcxr", folder / "evil.csv", out=out, progress=False)
    msg = str(err.value)
    assert "evil.csv row 3" in msg and "'../secret.txt'" in msg and "3 row(s)" in msg and "--allow-outside-root" in msg
    assert not out.exists()
    # Explicitly allowed: they are tried, fail as images, and the reasons quote nothing of their content.
    result = import_dataset("covidcxr", folder / "evil.csv", out=out, allow_outside_root=True, progress=False)
    assert len(result.manifest) == 2 and len(result.skipped) == 3
    reasons = " ".join(result.skipped["reason"]) + skipped_path(out).read_text()
    assert "TOPSECRET" not in reasons and "root:x" not in reasons and "PATH=" not in reasons
    # Other formats: a metadata file name climbing out of the repository names its row.
    repo = _ieee_layout(data_root, tmp_path)
    meta = pd.read_csv(repo / "metadata.csv", dtype=str, keep_default_na=False)
    meta.loc[2, "filename"] = "../../secret.txt"
    meta.to_csv(repo / "metadata.csv", index=False)
    with pytest.raises(ManifestError, match=r"metadata.csv row 3: image .*secret.txt.* outside the data root"):
        import_dataset("ieee8023", repo, progress=False)


def test_symlinks_out_of_the_folder_are_refused(data_root, tmp_path, monkeypatch):
    from covidcxr import paths

    monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path / "configured"))  # the shared folder is "elsewhere" here
    root = tmp_path / "chest_xray"
    (root / "train" / "NORMAL").mkdir(parents=True)
    src = _images(data_root, "kermany/normal", 2)
    shutil.copy(src[0], root / "train" / "NORMAL" / "IM-0001-0001.jpeg")
    (root / "train" / "NORMAL" / "IM-0002-0001.jpeg").symlink_to(src[1])
    with pytest.raises(ManifestError, match="file train/NORMAL/IM-0002-0001.jpeg: image .* outside the data root"):
        import_dataset("folders", root, progress=False)
    assert len(import_dataset("folders", root, allow_outside_root=True, progress=False).manifest) == 2


def test_csv_outputs_are_spreadsheet_safe_and_nul_bytes_refused(data_root, tmp_path):
    folder = _minimal_layout(data_root, tmp_path)
    t = pd.read_csv(folder / "manifest.csv")
    t["patient_id"] = ['=HYPERLINK("http://evil.example","open")', "+t:1", "@t:2"]
    t["notes"] = ["-5", "ok", "=1+1"]
    t.to_csv(folder / "manifest.csv", index=False)
    out = tmp_path / "m.csv"
    import_dataset("covidcxr", folder, out=out, progress=False)
    raw = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert raw["patient_id"].str.startswith("'").all() and raw["notes"].tolist() == ["'-5", "ok", "'=1+1"]
    assert Manifest.read(out).table["patient_id"].tolist() == t["patient_id"].tolist()  # read back exactly
    # A NUL byte in a covidcxr manifest is refused, naming row and column ...
    t.loc[1, "notes"] = "bad\x00note"
    t.to_csv(folder / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=r"row 2, column 'notes': contains a NUL byte"):
        import_dataset("covidcxr", folder, progress=False)
    # ... and a source's metadata row holding one is skipped with that reason.
    repo = _ieee_layout(data_root, tmp_path)
    meta = pd.read_csv(repo / "metadata.csv", dtype=str, keep_default_na=False)
    meta.loc[0, "sex"] = "M\x00"
    meta.to_csv(repo / "metadata.csv", index=False)
    result = import_dataset("ieee8023", repo, progress=False)
    assert "column 'sex' contains a NUL byte" in " ".join(result.skipped["reason"]) and len(result.manifest) == 2


def test_duplicated_column_in_source_metadata_is_an_error(data_root, tmp_path):
    repo = _ieee_layout(data_root, tmp_path)
    text = (repo / "metadata.csv").read_text().splitlines()
    (repo / "metadata.csv").write_text("\n".join([text[0] + ",finding"] + [line + ",x" for line in text[1:]]) + "\n")
    with pytest.raises(ManifestError, match="column 'finding' appears more than once"):
        import_dataset("ieee8023", repo, progress=False)


def test_age_out_of_range_in_an_import_names_the_row(data_root, tmp_path):
    repo = _ieee_layout(data_root, tmp_path)
    meta = pd.read_csv(repo / "metadata.csv", dtype=str, keep_default_na=False)
    meta.loc[1, "age"] = "999"
    meta.to_csv(repo / "metadata.csv", index=False)
    with pytest.raises(ManifestError, match=r"^metadata.csv row 2, column 'age': '999' is not an age between 0 and 120"):
        import_dataset("ieee8023", repo, progress=False)


def test_one_frontal_view_rule_for_every_format(data_root, tmp_path):
    import pydicom

    folder = _minimal_layout(data_root, tmp_path)
    t = pd.read_csv(folder / "manifest.csv")
    t["view"] = ["PA", "LL", "RAO"]  # DICOM ViewPosition codes of the reader's NON_FRONTAL_VIEWS
    t.to_csv(folder / "manifest.csv", index=False)
    result = import_dataset("covidcxr", folder, progress=False)
    assert result.manifest.table["view"].tolist() == ["PA"]
    assert sorted(result.skipped["reason"]) == ["view LL: not frontal (lateral)", "view RAO: not frontal (oblique)"]
    # DICOM without decoding (--no-check-images): the header's lateral view is still refused.
    root = tmp_path / "dicoms"
    root.mkdir()
    ds = pydicom.dcmread(data_root / "dicom" / "RG1_UNCR.dcm")
    ds.ViewPosition = "LL"
    ds.save_as(root / "lateral.dcm")
    shutil.copy(data_root / "dicom" / "RG1_J2KI.dcm", root / "chest.dcm")
    pd.DataFrame({"file": ["lateral.dcm", "chest.dcm"], "label": ["covid", "normal"]}).to_csv(root / "labels.csv", index=False)
    quick = import_dataset("dicom", root, check_images=False, progress=False)
    assert quick.manifest.table["view"].tolist() == ["PA"]
    assert quick.skipped["reason"].tolist() == ["view LL: not frontal (lateral)"]


@pytest.mark.parametrize("reader_has_read_file_bytes", [True, False])
def test_fifo_and_folder_rows_are_skipped_without_opening_them(data_root, tmp_path, monkeypatch,
                                                               reader_has_read_file_bytes):
    import os

    from covidcxr.data import io

    if not reader_has_read_file_bytes:
        monkeypatch.delattr(io, "read_file_bytes", raising=False)
    folder = _minimal_layout(data_root, tmp_path, n=2)
    os.mkfifo(folder / "images" / "pipe.jpg")  # reading it would block forever
    (folder / "images" / "dir.jpg").mkdir()
    t = pd.read_csv(folder / "manifest.csv")
    extra = pd.DataFrame([t.iloc[0].to_dict() | {"image": "images/pipe.jpg", "patient_id": "t:8"},
                          t.iloc[0].to_dict() | {"image": "images/dir.jpg", "patient_id": "t:9"},
                          t.iloc[0].to_dict() | {"image": "images/gone.jpg", "patient_id": "t:10"}])
    pd.concat([t, extra]).to_csv(folder / "manifest.csv", index=False)
    result = import_dataset("covidcxr", folder, progress=False)
    assert len(result.manifest) == 2
    reasons = dict(zip(result.skipped["image"].map(lambda p: Path(p).name), result.skipped["reason"]))
    assert set(reasons) == {"pipe.jpg", "dir.jpg", "gone.jpg"} and reasons["gone.jpg"] == "file not found"
