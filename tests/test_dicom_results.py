"""The DICOM node's parts without a PACS: checks and statuses, SR / Secondary Capture content, queue, settings."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from dicom_helpers import bad_instances, good_dx
from serving_helpers import DICOM, dicom_identifiers, serving_run


@pytest.fixture(scope="module")
def analyser(request, tmp_path_factory):
    from covidcxr.serving.dicom.analysis import Analyser

    return Analyser(serving_run(request, tmp_path_factory))


@pytest.fixture(scope="module")
def shared_analysis(analyser, data_root):
    """The real shared chest CR (JPEG 2000) analysed once: (bytes, header, Analysis)."""
    from covidcxr.serving.dicom.analysis import read_header

    data = (data_root / "dicom" / "RG1_J2KI.dcm").read_bytes()
    source = read_header(data)
    return data, source, analyser.analyse(analyser.check(data, source), source)


def test_refused_instances_get_their_dimse_status(analyser, data_root):
    from covidcxr.serving.dicom import analysis as a

    expected = {"sr": a.SOP_CLASS_NOT_SUPPORTED, "ct_sop_class": a.SOP_CLASS_NOT_SUPPORTED,
                "ct_modality": a.NOT_FRONTAL_CHEST, "lateral": a.NOT_FRONTAL_CHEST, "truncated": a.UNREADABLE}
    reasons = {}
    for kind, data in bad_instances(data_root).items():
        with pytest.raises(a.Refused) as info:
            analyser.check(data)
        assert info.value.status == expected[kind], (kind, info.value)
        reasons[kind] = info.value.reason
    assert "Basic Text SR" in reasons["sr"] and "CT Image Storage" in reasons["ct_sop_class"]
    assert "Modality is CT" in reasons["ct_modality"] and "ViewPosition is LL" in reasons["lateral"]
    assert "truncated" in reasons["truncated"]
    with pytest.raises(a.Refused) as info:
        analyser.check(b"\0" * 200 + b"not dicom at all")
    assert info.value.status == a.UNREADABLE
    # the shared CR pair and a wrapped DX pass
    for data in ((data_root / DICOM).read_bytes(), good_dx(data_root)):
        assert analyser.check(data).tensor.ndim == 3


def test_sr_carries_probabilities_decision_model_and_statement(analyser, shared_analysis):
    from covidcxr.serving.dicom.report import RESEARCH_USE, read_report

    data, source, analysis = shared_analysis
    run = analyser.run
    sr = pydicom.dcmread(io.BytesIO(_encode(analysis.results[0])))  # through a file round trip
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.Modality == "SR"  # Comprehensive SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    content = read_report(sr)
    assert list(content["probabilities"]) == ["covid", "non-covid"]  # P(covid) first
    for j, cls in enumerate(run.classes):
        assert content["probabilities"][cls] == pytest.approx(float(analysis.record.probabilities[j]), rel=1e-6,
                                                              abs=1e-12)
    assert content["decision"] == analysis.record.predicted == run.decide(analysis.record.probabilities[None])[0]
    assert content["threshold"] == pytest.approx(run.threshold)
    assert content["algorithm"]["weights_sha256"] == run.model_sha256
    assert content["algorithm"]["name"] == f"covidcxr {run.record.architecture}"
    assert content["algorithm"]["version"].startswith("0.") and run.model_sha256[:12] in content["algorithm"]["version"]
    assert content["statements"] == [RESEARCH_USE] and "not a diagnosis" in RESEARCH_USE
    assert content["source_sop_instance_uids"] == [str(source.SOPInstanceUID)]


def test_results_go_into_the_source_study_with_copied_patient_and_new_uids(analyser, shared_analysis, data_root):
    data, source, analysis = shared_analysis
    sr, sc = analysis.results
    for obj in (sr, sc):
        assert obj.StudyInstanceUID == source.StudyInstanceUID
        assert obj.SeriesInstanceUID != source.SeriesInstanceUID and obj.SOPInstanceUID != source.SOPInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "AccessionNumber", "StudyID"):
            assert str(obj.get(keyword, "")) == str(source.get(keyword, "")), keyword
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    # derived, not random: the same instance gives the same objects' UIDs again (a PACS stores them once)
    from covidcxr.serving.dicom.uids import result_uids

    assert [result_uids(source, analyser.run.model_sha256, kind) for kind in ("sr", "overlay")] == \
        [(o.SeriesInstanceUID, o.SOPInstanceUID) for o in analysis.results]
    assert result_uids(source, "0" * 64, "sr")[1] != sr.SOPInstanceUID  # another model: other objects
    # another instance of the same study (the uncompressed twin): same result series, new instances

    twin = pydicom.dcmread(data_root / DICOM, stop_before_pixels=True)
    assert twin.StudyInstanceUID == source.StudyInstanceUID and twin.SOPInstanceUID != source.SOPInstanceUID
    series, sop = result_uids(twin, analyser.run.model_sha256, "sr")
    assert series == sr.SeriesInstanceUID and sop != sr.SOPInstanceUID


def test_secondary_capture_shows_the_overlay_with_the_probability_burned_in(analyser, shared_analysis):
    from covidcxr.serving.dicom.capture import banner_lines

    data, source, analysis = shared_analysis
    sc = pydicom.dcmread(io.BytesIO(_encode(analysis.results[1])))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.PhotometricInterpretation == "RGB" and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    pixels = sc.pixel_array
    assert pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 512
    lines = banner_lines(analysis.record, analyser.run)
    assert lines[0].startswith("P(covid) = ") and lines[-1] == "RESEARCH USE ONLY - NOT A DIAGNOSIS"
    assert "P(covid)" in sc.ImageComments
    # the banner (top rows) is black with white text; the image below is coloured (the heatmap)
    top = pixels[:40]
    assert (top.max(axis=2) == 0).mean() > 0.5 and (top.min(axis=2) > 200).any()
    body = pixels[pixels.shape[0] // 2:].astype(int)
    assert np.abs(body[..., 0] - body[..., 2]).mean() > 5


def test_audit_rows_hold_no_patient_identifiers(tmp_path, data_root):
    from covidcxr.serving.dicom.audit import DicomAuditLog

    data = (data_root / DICOM).read_bytes()
    header = pydicom.dcmread(data_root / DICOM, stop_before_pixels=True)
    log = DicomAuditLog(f"sqlite:///{tmp_path / 'a.sqlite'}")
    # a reason that (wrongly) quotes the header is scrubbed against the instance's bytes
    log.record("refused", data=data, error=f"refused {header.PatientName} {header.PatientID}", dimse_status=0xC002)
    text = repr(log.rows())
    for value in dicom_identifiers(data_root) + [str(header.SOPInstanceUID)]:
        assert value not in text


def test_spool_survives_restart_and_never_queues_an_instance_twice(tmp_path):
    from covidcxr.serving.dicom.spool import Spool

    spool = Spool(tmp_path / "spool")
    assert spool.add("a" * 64, b"one") is None and spool.add("b" * 64, b"two") is None
    assert spool.add("a" * 64, b"one again") == "queued"
    first = spool.claim(timeout=0)
    assert first.path.read_bytes() == b"one"
    (tmp_path / "spool" / "incoming" / "stray.dcm").write_bytes(b"written, never committed")
    spool.close()  # "crash" with one instance processing, one queued
    spool = Spool(tmp_path / "spool")
    assert spool.recovered == 1 and not (tmp_path / "spool" / "incoming" / "stray.dcm").exists()
    assert spool.counts() == {"queued": 2, "processing": 0, "done": 0, "failed": 0}
    claimed = [spool.claim(timeout=0), spool.claim(timeout=0)]
    assert spool.claim(timeout=0) is None
    spool.finish(claimed[0], "done")
    spool.finish(claimed[1], "failed")
    assert not claimed[0].path.exists() and not claimed[1].path.exists()
    assert spool.add("a" * 64, b"one") == "done"  # processed: acknowledged, never again
    assert spool.add("b" * 64, b"two") is None  # failed: may be sent again
    spool.close()
    kept = Spool(tmp_path / "spool2", keep_folder=tmp_path / "keep")
    kept.add("c" * 64, b"three")
    item = kept.claim(timeout=0)
    kept.finish(item, "done")
    assert not item.path.exists() and (tmp_path / "keep" / item.path.name).read_bytes() == b"three"
    kept.close()


def test_settings_are_validated(tmp_path):
    from covidcxr.errors import ConfigError
    from covidcxr.serving.dicom.settings import load_node_settings, parse_destination

    config = tmp_path / "node.yaml"
    config.write_text("ae_title: AI_NODE\nallowed_callers: [ORTHANC, CR_ROOM_2]\n"
                      "destination: {ae_title: PACS, host: pacs.example.org, port: 4242}\n")
    s = load_node_settings(config, port=104, allowed_callers=None)  # options win; None = not given
    assert (s.ae_title, s.port, s.allowed_callers, s.destination.port) == ("AI_NODE", 104, ["ORTHANC", "CR_ROOM_2"], 4242)
    assert s.audit_url("/r").endswith("/r/dicom-spool/dicom-audit.sqlite")
    config.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="node.yaml"):
        load_node_settings(config)

    s = load_node_settings(None, ae_title="COVIDCXR", allowed_callers=["ORTHANC"], port=11112)
    assert s.allowed_callers == ["ORTHANC"] and s.destination is None
    assert parse_destination("PACS@pacs.example.org:4242").port == 4242
    for bad in ({"ae_title": "A" * 17}, {"port": 70000}, {"allowed_callers": ["BAD\\AE"]}, {"unknown": 1}):
        with pytest.raises(ConfigError):
            load_node_settings(None, **bad)
    with pytest.raises(ConfigError):
        parse_destination("pacs.example.org:4242")


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
