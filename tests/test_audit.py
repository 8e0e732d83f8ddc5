"""Data audit on the real shared data: leakage, planted near-duplicates, source / demographic shortcuts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from covidcxr import paths
from covidcxr.cli import app
from covidcxr.data.audit import HASH_VERSION, audit_manifest, hamming_pairs, source_only_auc
from covidcxr.data.manifest import Manifest


def _checks(report, severity=None):
    return [f.check for f in report.findings if severity is None or f.severity == severity]


def test_shared_data_audit_flags_source_confounding(split_manifest, monkeypatch):
    r = audit_manifest(split_manifest, progress=False)  # cold: hashes all 3,495 images into the cache
    assert r.n_images == 3495 and r.ok and not r.errors
    assert "patient_overlap" in _checks(r, "info")
    # Every COVID image comes from ieee8023 / Figure1, which hold almost no negatives.
    covid = [f for f in r.findings if f.check == "label_predictable_from_source" and f.details["label"] == "covid"]
    assert len(covid) == 1 and covid[0].severity == "warning" and covid[0].details["auc"] > 0.95
    assert set(covid[0].details["sources"]) == {"s-mostafa-a/covid-chestxray-dataset", "agchung/Figure1-COVID-chestxray-dataset"}
    single = [f.details["source"] for f in r.findings if f.check == "single_label_source"]
    assert single == ["rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS"]
    # Kermany / RSNA carry no ages: the audit says ages cannot be compared, naming those sources.
    missing = [f for f in r.findings if f.check == "age_missing_differs"]
    assert missing and "lecuong1502/BTL_Machine_Learning" in missing[0].details["sources_without_age"]
    # Source x label table per split agrees with the manifest.
    sxl = r.tables["source_x_label"]
    assert sxl.loc[("all", "muhammedtalo/COVID-19"), "normal"] == 431
    assert sxl.loc["test"]["total"].sum() == (split_manifest.table["split"] == "test").sum()
    # The README: no two kept images are within pHash distance 12, different people sit >= 44 apart.
    assert not (r.duplicates["kind"] != "within").any()
    d = r.to_dict()
    json.dumps(d)
    assert d["tables"]["source_only_auc"]["covid"]["all"] > 0.95
    assert d["settings"]["manifest_sha256"] == split_manifest.sha256()

    # Warm: the hashes come from the cache (keyed by content), nothing is decoded again.
    cache = paths.cache_dir() / "phash" / f"{HASH_VERSION}.sqlite"
    assert cache.is_file()
    import covidcxr.data.audit.duplicates as audit

    def no_decoding(*a, **k):
        raise AssertionError("warm cache must not decode images")

    monkeypatch.setattr(audit, "_phash_bytes", no_decoding)
    warm = audit_manifest(split_manifest, progress=False)
    assert warm.to_dict()["findings"] == d["findings"]


def _sample(split_manifest, per_source=3) -> pd.DataFrame:
    t = split_manifest.table
    return t.sort_values("image").groupby(["source", "split"]).head(1).groupby("source").head(per_source).copy()


def test_planted_near_duplicate_is_found_and_only_it(split_manifest, tmp_path):
    rows = _sample(split_manifest)
    rows["image"] = [str(p) for p in Manifest(rows, root=split_manifest.root).image_paths()]
    original = rows.iloc[0]
    img = Image.open(original["image"])
    copy_path = tmp_path / "copy.jpg"  # a resized, re-encoded copy, as a second source would hold it
    img.resize((int(img.width * 0.8), int(img.height * 0.8)), Image.LANCZOS).save(copy_path, quality=70)
    other_split = "test" if original["split"] != "test" else "train"
    planted = original.copy()
    planted.update({"image": str(copy_path), "source": "someone/re-upload", "patient_id": "reupload:1",
                    "split": other_split})
    table = pd.concat([rows, planted.to_frame().T], ignore_index=True)
    m = Manifest(table, root=tmp_path)
    report = audit_manifest(m, progress=False)
    assert len(report.duplicates) == 1  # unrelated images of the sample are not flagged
    pair = report.duplicates.iloc[0]
    assert {pair["image_a"], pair["image_b"]} == {original["image"], str(copy_path)}
    assert pair["kind"] == "cross-split" and pair["distance"] <= 12 and not pair["same_patient"]
    dup = [f for f in report.findings if f.check == "near_duplicate" and f.severity != "info"]
    assert len(dup) == 1 and dup[0].severity == "warning" and report.ok
    strict = audit_manifest(m, strict=True, progress=False)
    assert not strict.ok and [f.check for f in strict.errors] == ["near_duplicate"]
    # The same image re-saved as PNG by another source inside the same split: a cross-source pair.
    png_path = tmp_path / "copy.png"
    img.save(png_path)
    same_split = original.copy()
    same_split.update({"image": str(png_path), "source": "third/mirror", "patient_id": "mirror:1"})
    m2 = Manifest(pd.concat([rows, same_split.to_frame().T], ignore_index=True), root=tmp_path)
    pairs = audit_manifest(m2, progress=False).duplicates
    assert len(pairs) == 1 and pairs["kind"].iloc[0] == "cross-source" and pairs["distance"].iloc[0] <= 4


def test_patient_overlap_and_unreadable_images(split_manifest, tmp_path):
    rows = _sample(split_manifest, 2)
    rows["image"] = [str(p) for p in Manifest(rows, root=split_manifest.root).image_paths()]
    leak = rows.iloc[0].copy()
    leak.update({"image": str(split_manifest.image_paths()[-1]), "split": "test" if rows.iloc[0]["split"] != "test" else "val"})
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    bad1 = rows.iloc[1].copy()
    bad1.update({"image": str(broken), "patient_id": "x:1"})
    bad2 = rows.iloc[1].copy()
    bad2.update({"image": str(tmp_path / "missing.jpg"), "patient_id": "x:2"})
    m = Manifest(pd.concat([rows, pd.DataFrame([leak, bad1, bad2])], ignore_index=True), root=tmp_path)
    report = audit_manifest(m, progress=False)
    assert [f.check for f in report.errors] == ["patient_overlap"]
    assert leak["patient_id"] in report.errors[0].message
    assert {u["image"] for u in report.unreadable} == {str(broken), str(tmp_path / "missing.jpg")}
    assert any("not found" in u["reason"] for u in report.unreadable)
    assert "unreadable_image" in _checks(report, "warning")


def test_balanced_synthetic_table_raises_no_source_warning(split_manifest):
    rng = np.random.default_rng(0)
    n = 240
    table = pd.DataFrame({
        "image": [f"img/{i}.jpg" for i in range(n)],
        "label": np.tile(["covid", "normal", "pneumonia"], n // 3),
        "source": np.repeat(["a", "b", "c", "d"], n // 4),
        "patient_id": [f"p:{i}" for i in range(n)],
        "age": rng.integers(20, 80, n).astype(str), "sex": rng.choice(["M", "F"], n), "view": rng.choice(["PA", "AP"], n),
        "split": rng.choice(["train", "val", "test"], n),
    })
    report = audit_manifest(Manifest(table, root="."), duplicates=False, progress=False)
    assert report.ok and not report.warnings, [f.message for f in report.warnings]
    assert abs(source_only_auc(table, "covid") - 0.5) < 1e-9


def test_hamming_pairs_matches_brute_force():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 256, size=(120, 32), dtype=np.uint8)
    hashes[10] = hashes[100]
    hashes[11] = hashes[110] ^ np.array([1, 3] + [0] * 30, dtype=np.uint8)  # 3 bits apart
    i, j, d = hamming_pairs(hashes, 110, block=32)
    bits = np.unpackbits(hashes, axis=1).astype(int)
    brute = {(a, b): int(np.sum(bits[a] != bits[b])) for a in range(120) for b in range(a + 1, 120)}
    expected = {k: v for k, v in brute.items() if v <= 110}
    assert dict(zip(zip(i.tolist(), j.tolist()), d.tolist())) == expected
    assert expected[(10, 100)] == 0 and expected[(11, 110)] == 3


def test_audit_cli_json_and_exit_code(split_manifest, tmp_path):
    rows = _sample(split_manifest, 2)
    m = Manifest(rows, root=split_manifest.root)
    clean = m.write(tmp_path / "clean.csv")
    runner = CliRunner()
    out = tmp_path / "audit.json"
    png = tmp_path / "audit.png"
    result = runner.invoke(app, ["data", "audit", str(clean), "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = json.loads(out.read_text())
    assert report["ok"] and report["n_images"] == len(rows) and "source_x_label" in report["tables"]
    leaky = rows.copy()
    leaky.loc[leaky.index[1], "patient_id"] = leaky["patient_id"].iloc[0]
    leaky.loc[leaky.index[1], "split"] = "test" if leaky["split"].iloc[0] != "test" else "train"
    bad = Manifest(leaky, root=split_manifest.root).write(tmp_path / "leaky.csv")
    result = runner.invoke(app, ["data", "audit", str(bad), "--no-duplicates"])
    assert result.exit_code == 1 and "patient_overlap" in result.output


def test_audit_refuses_images_outside_the_data_root(split_manifest, tmp_path):
    import pytest

    from covidcxr.errors import ManifestError

    rows = _sample(split_manifest, 1)
    rows["image"] = [str(p) for p in Manifest(rows, root=split_manifest.root).image_paths()]  # in the data root
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET token=abc\n")
    evil = rows.iloc[0].copy()
    evil.update({"image": str(secret), "patient_id": "x:1"})
    folder = tmp_path / "data"
    folder.mkdir()
    m = Manifest(pd.concat([rows, evil.to_frame().T], ignore_index=True), root=folder)
    path = m.write(folder / "m.csv")
    with pytest.raises(ManifestError, match=f"m.csv row {len(rows) + 1}, column 'image'.*outside the data root"):
        audit_manifest(Manifest.read(path), progress=False)
    assert audit_manifest(Manifest.read(path), duplicates=False, progress=False).ok  # tables only: nothing is opened
    runner = CliRunner()
    refused = runner.invoke(app, ["data", "audit", str(path)])
    assert refused.exit_code != 0 and isinstance(refused.exception, ManifestError)
    allowed = runner.invoke(app, ["data", "audit", str(path), "--allow-outside-root", "--json", str(tmp_path / "a.json")])
    assert allowed.exit_code == 0, allowed.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert [Path(u["image"]).resolve() for u in report["unreadable"]] == [secret.resolve()]
    assert "TOPSECRET" not in (tmp_path / "a.json").read_text() and "TOPSECRET" not in allowed.output
