"""The DICOM node against a real Orthanc PACS (Debian's orthanc + orthanc-dicomweb, started per module).

End to end: the shared CR pair and real shared images wrapped as DX go into Orthanc; Orthanc sends
them to ``covidcxr dicom listen``'s node (``/modalities/.../store``); the SR and the overlay arrive in
the right study, and the SR's probability is what ``covidcxr predict`` says on the same file. Bad
instances get their status and a log line while the node keeps serving; a restart mid-queue loses
and duplicates nothing; DICOMweb scoring goes through Orthanc's DICOMweb plugin.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from typer.testing import CliRunner

from dicom_helpers import Sender, bad_instances, good_dx, sop_instance_uid
from orthanc_helpers import OrthancServer
from serving_helpers import dicom_identifiers, serving_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(request, tmp_path_factory):
    return serving_run(request, tmp_path_factory)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def analyser(run_dir):
    from covidcxr.serving.dicom.analysis import Analyser

    return Analyser(run_dir)


def _node(run_dir, pacs, tmp_path, analyser, name="covidcxr", **settings):
    from covidcxr.serving.dicom.node import DicomNode
    from covidcxr.serving.dicom.settings import Destination, NodeSettings

    s = NodeSettings(port=0, allowed_callers=["ORTHANC"], spool=tmp_path / "spool",
                     destination=Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port), **settings)
    return DicomNode(run_dir, s, analyser=analyser)


def _results(pacs, study_id: str) -> dict[str, list[pydicom.Dataset]]:
    """The study's instances in Orthanc by modality (SR, OT = the overlay, CR, DX)."""
    out: dict[str, list] = {}
    for series in pacs.study_series(study_id):
        for instance in series["Instances"]:
            ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(instance)))
            out.setdefault(str(ds.Modality), []).append(ds)
    return out


def test_orthanc_sends_studies_and_gets_sr_and_overlay_back(run_dir, pacs, analyser, data_root, tmp_path):
    from covidcxr.cli import app
    from covidcxr.serving.dicom.report import read_report

    files = {"cr_j2k": data_root / "dicom" / "RG1_J2KI.dcm", "cr_raw": data_root / "dicom" / "RG1_UNCR.dcm"}
    for i in (0, 1):
        files[f"dx{i}"] = tmp_path / f"dx{i}.dcm"
        files[f"dx{i}"].write_bytes(good_dx(data_root, i, patient_id=f"CXR-E2E-{i}"))
    uploaded = {k: pacs.upload(p.read_bytes()) for k, p in files.items()}
    studies = sorted({u["ParentStudy"] for u in uploaded.values()})
    assert len(studies) == 3  # the CR pair is one study
    with _node(run_dir, pacs, tmp_path, analyser) as node:
        pacs.add_modality("covidcxr", "COVIDCXR", node.port)
        assert pacs.rest("POST", "/modalities/covidcxr/echo", json={}) == {}
        answer = pacs.store_to("covidcxr", studies)
        assert answer["InstancesCount"] == 4 and answer["FailedInstancesCount"] == 0
        assert node.wait_idle(300)
        spool_files = list(node.spool.incoming.iterdir())
        audit = node.audit.rows()
    assert spool_files == []  # deleted once processed
    predicted = tmp_path / "pred.csv"
    result = CliRunner().invoke(app, ["predict", str(run_dir), *map(str, files.values()), "--out", str(predicted)])
    assert result.exit_code == 0, result.output
    expected = pd.read_csv(predicted).set_index("path")["prob_covid"]
    for key, path in files.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        got = _results(pacs, uploaded[key]["ParentStudy"])
        reports = [r for r in got["SR"] if read_report(r)["source_sop_instance_uids"] == [source.SOPInstanceUID]]
        overlays = [o for o in got["OT"] if o.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID]
        assert len(reports) == 1 and len(overlays) == 1, key
        for obj in reports + overlays:
            assert obj.StudyInstanceUID == source.StudyInstanceUID
            assert (obj.PatientID, str(obj.PatientName)) == (source.PatientID, str(source.PatientName))
        # The node scores one image at a time and `predict` in batches: float32 kernels for different
        # batch sizes sum in different orders (1.1e-5 relative on one fresh machine), so not bit-equal.
        assert read_report(reports[0])["probabilities"]["covid"] == pytest.approx(expected[str(path)], rel=1e-4,
                                                                                  abs=1e-7)
    processed = [r for r in audit if r["event"] == "processed"]
    assert len(processed) == 4 and all(r["results_sent"] == 2 for r in processed)
    text = repr(audit)
    for value in dicom_identifiers(data_root) + ["CXR-E2E-0", "Test^Patient"]:
        assert value not in text
    for path in files.values():
        assert str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) not in text


def test_bad_instances_get_status_and_log_line_and_the_node_keeps_serving(run_dir, pacs, analyser, data_root,
                                                                           tmp_path, caplog):
    from covidcxr.serving.dicom import analysis as a

    caplog.set_level(logging.INFO, logger="covidcxr.dicom")
    bad = bad_instances(data_root)
    expected = {"sr": a.SOP_CLASS_NOT_SUPPORTED, "ct_sop_class": a.SOP_CLASS_NOT_SUPPORTED,
                "ct_modality": a.NOT_FRONTAL_CHEST, "lateral": a.NOT_FRONTAL_CHEST, "truncated": a.UNREADABLE}
    good = good_dx(data_root, 2)
    with _node(run_dir, pacs, tmp_path, analyser) as node:
        sender = Sender(node.port)
        answers = dict(zip(bad, sender.store(*bad.values())))
        assert sender.echo() == 0  # still serving
        assert sender.store(good) == [(0, "")]
        assert Sender(node.port, calling="INTRUDER").echo() is None  # unknown caller: association rejected
        assert node.wait_idle(300)
        audit = node.audit.rows()
        counts = node.spool.counts()
    for kind, (status, comment) in answers.items():
        assert status == expected[kind], (kind, hex(status), comment)
        assert comment, kind  # the reason travels in ErrorComment
    refusals = [r.getMessage() for r in caplog.records if "refused: status" in r.getMessage()]
    assert len(refusals) == len(bad)
    assert any("0xC001" in m and "ViewPosition is LL" in m for m in refusals)
    assert any("0xC002" in m and "truncated" in m for m in refusals)
    assert any("0x0122" in m and "Basic Text SR" in m for m in refusals)
    assert any("INTRUDER" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)
    assert [r["dimse_status"] for r in audit if r["event"] == "refused"] == [expected[k] for k in bad]
    assert [r["event"] for r in audit].count("processed") == 1 and counts["queued"] == 0
    assert any(r["event"] == "rejected" and r["calling_ae"] == "INTRUDER" for r in audit)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_restart_mid_queue_loses_nothing_and_duplicates_nothing(run_dir, pacs, analyser, data_root, tmp_path):
    from covidcxr.serving.dicom.report import read_report

    study = good_dx(data_root, 0, patient_id="CXR-RESTART")
    study_uid = str(pydicom.dcmread(io.BytesIO(study), stop_before_pixels=True).StudyInstanceUID)
    instances = [good_dx(data_root, i, patient_id="CXR-RESTART", study_uid=study_uid) for i in range(4)]
    real = analyser.analyse
    calls = {"n": 0}

    def killed_on_second(prepared, source):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill of the node while it processes an instance")
        return real(prepared, source)

    node = _node(run_dir, pacs, tmp_path, analyser).start(worker=False)
    try:
        assert [s for s, _ in Sender(node.port).store(*instances)] == [0, 0, 0, 0]  # acknowledged = on disk
        analyser.analyse = killed_on_second
        node.start_worker()
        node.worker.join(300)  # the worker dies with the 2nd instance in hand
        assert not node.worker.is_alive()
        counts = node.spool.counts()
        assert counts["done"] == 1 and counts["processing"] == 1 and counts["queued"] == 2
    finally:
        analyser.analyse = real
        node.worker = None
        node.stop()
    with _node(run_dir, pacs, tmp_path, analyser) as node:  # same spool: the restart
        assert node.spool.recovered == 1
        assert node.wait_idle(300)
        # the first instance sent again after it was processed: acknowledged, not processed twice
        assert Sender(node.port).store(instances[0]) == [(0, "")]
        assert node.wait_idle(300)
        audit = node.audit.rows()
        assert node.spool.counts() == {"queued": 0, "processing": 0, "done": 4, "failed": 0}
    processed = [r["sop_uid_sha256"] for r in audit if r["event"] == "processed"]
    assert len(processed) == 4 == len(set(processed))
    assert [r["event"] for r in audit].count("duplicate") == 1
    found = pacs.rest("POST", "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    results = _results(pacs, found[0])
    sources = sorted(read_report(r)["source_sop_instance_uids"][0] for r in results["SR"])
    assert sources == sorted(sop_instance_uid(d) for d in instances)  # one SR per instance, none twice
    assert len(results["OT"]) == 4


def test_dicomweb_score_finds_fetches_and_stores_through_orthanc(run_dir, pacs, analyser, data_root, tmp_path):
    from covidcxr.serving.dicom.dicomweb import score_study
    from covidcxr.serving.dicom.report import read_report
    from covidcxr.serving.dicom.settings import NodeSettings

    data = good_dx(data_root, 3, patient_id="CXR-WEB")
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    uploaded = pacs.upload(data)
    pacs.upload(bad_instances(data_root)["lateral"])  # another study: not touched
    settings = NodeSettings(spool=tmp_path / "spool")
    result = score_study(run_dir, pacs.dicomweb_url, str(source.StudyInstanceUID), settings=settings,
                         analyser=analyser)
    assert result.study_found and len(result.processed) == 1 and result.stored == 2
    got = _results(pacs, uploaded["ParentStudy"])
    report = read_report(got["SR"][0])
    assert report["probabilities"] == pytest.approx(result.processed[0]["probabilities"], rel=1e-6)
    assert report["source_sop_instance_uids"] == [str(source.SOPInstanceUID)]
    assert len(got["OT"]) == 1
    # the command, again: the first run's results are skipped (not CR / DX); same result UIDs, so still one SR
    from covidcxr.cli import app

    again = CliRunner().invoke(app, ["dicom", "score", str(run_dir), "--dicomweb", pacs.dicomweb_url,
                                     "--study", str(source.StudyInstanceUID)])
    assert again.exit_code == 0, again.output
    assert "1 instance(s) analysed, 2 skipped, 2 result object(s) stored" in again.output
    assert len(_results(pacs, uploaded["ParentStudy"])["SR"]) == 1
    missing = score_study(run_dir, pacs.dicomweb_url, "1.2.3.4.5.6.7.8.9", settings=settings, analyser=analyser)
    assert not missing.study_found


def test_listen_command_serves_until_sigterm(run_dir, pacs, data_root, tmp_path):
    """``covidcxr dicom listen`` as a process: C-ECHO, one instance in, its results in Orthanc, clean stop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from orthanc_helpers import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "covidcxr.cli", "dicom", "listen", str(run_dir), "--ae-title", "COVIDCXR",
           "--port", str(port), "--allow-caller", "ORTHANC", "--destination", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
           "--spool", str(tmp_path / "spool")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + 300  # generous: model load on a busy 2-core machine
        while Sender(port).echo() != 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=5)
            time.sleep(0.3)
        data = good_dx(data_root, 4, patient_id="CXR-CLI")
        study_uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
        assert Sender(port).store(data) == [(0, "")]
        while not (found := pacs.rest("POST", "/tools/find", json={"Level": "Series", "Query": {
                "StudyInstanceUID": study_uid, "Modality": "SR"}})):
            assert time.monotonic() < deadline, "no SR arrived in Orthanc"
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "listening as COVIDCXR" in out
    assert "accepted, queued" in err and "2 result(s) sent to ORTHANC" in err


def test_unreachable_destination_keeps_the_instance_queued_for_a_retry(run_dir, analyser, data_root, tmp_path):
    import time

    from covidcxr.serving.dicom.node import DicomNode
    from covidcxr.serving.dicom.settings import Destination, NodeSettings
    from orthanc_helpers import free_port

    settings = NodeSettings(port=0, allowed_callers=["ORTHANC"], spool=tmp_path / "spool",
                            destination=Destination(ae_title="GONE", host="127.0.0.1", port=free_port()))
    with DicomNode(run_dir, settings, analyser=analyser) as node:
        assert Sender(node.port).store(good_dx(data_root, 0)) == [(0, "")]
        deadline = time.monotonic() + 300
        while not any(r["event"] == "send-retry" for r in node.audit.rows()):
            assert time.monotonic() < deadline, node.audit.rows()
            time.sleep(0.2)
        assert node.spool.counts()["queued"] == 1 and len(list(node.spool.incoming.iterdir())) == 1
        assert "GONE@127.0.0.1" in [r for r in node.audit.rows() if r["event"] == "send-retry"][0]["error"]
