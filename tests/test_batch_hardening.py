"""``covidcxr predict`` against hostile inputs and interrupted jobs (red-team issue), on real shared images.

A batch never ends on one file and no input vanishes; exit codes; --overwrite twice; --resume after a
row torn mid-write; the archive expansion cap; the temporary folder on exit, exception, SIGTERM and
after kill -9; spreadsheet formulas neutralised in every CSV written.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from badinput import write_corpus
from covidcxr.cli import app
from serving_helpers import killed_predict_job, sample_paths, serving_run

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(request, tmp_path_factory):
    return serving_run(request, tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run_dir):
    from covidcxr.models.run import load_run

    return load_run(run_dir)


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _raw_cells(path: Path) -> list[str]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return [cell for row in csv.reader(f) for cell in row]


def _leftover(folder: Path) -> list[Path]:
    return sorted(folder.glob("covidcxr-predict-*"))


# ---------------------------------------------------------------------------- requirement 8 (and 1, 2, 7)


def _every_entry(folder: Path) -> set[str]:
    """What the folder holds, found independently of covidcxr: every non-folder entry and empty folders."""
    from covidcxr.serving.batch import display_name

    entries = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        entries.update(display_name(os.path.join(dirpath, n)) for n in filenames + links)
        if not dirnames and not filenames:
            entries.add(display_name(dirpath))
    return entries


def test_mixed_folder_of_good_images_and_every_crasher(run_dir, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names, so that formula-like names start a cell
    images = sample_paths(data_root, 3)
    mixed = Path("mixed")
    cases = write_corpus(mixed / "corpus", data_root)
    for image in images:
        shutil.copy(image, mixed / image.name)
    bad_name = os.fsdecode(os.path.join(os.fsencode(mixed), b"bad\xff.png"))
    shutil.copy(images[0], bad_name)  # a real image whose name is not UTF-8
    os.mkfifo(mixed / "pipe.jpg")
    os.symlink("/dev/zero", mixed / "zeros.dcm")
    os.symlink("self.jpg", mixed / "self.jpg")
    os.symlink("nowhere.jpg", mixed / "gone.jpg")
    (mixed / "notes.txt").write_text("a note, not an image\n")
    shutil.copy(images[1], "=1+2.jpg")  # predicted: its path must not become a formula
    Path("@SUM(A1).png").write_text("text, not an image\n")  # skipped: same for the skipped list
    named = ["=1+2.jpg", "@SUM(A1).png", "+missing.png", "-missing.png"]
    out = Path("pred.csv")

    from covidcxr.files import csv_unquote
    from covidcxr.serving.batch import display_name

    result = _invoke("predict", run_dir, "--out", out, "--batch-size", "4", "--", mixed, *named)
    assert result.exit_code == 0, result.output  # bad files do not fail a job that predicted something
    table = pd.read_csv(out, dtype=str)
    skipped = pd.read_csv("pred.csv.skipped.csv", dtype=str, keep_default_na=False)
    predicted, reasons = set(csv_unquote(table)["path"]), dict(csv_unquote(skipped).values.tolist())
    assert not predicted & set(reasons)
    # none vanishes: every entry of the folder and every name given is predicted or listed
    assert _every_entry(mixed) | set(named) == predicted | set(reasons)
    assert {str(mixed / p.name) for p in images} | {"mixed/bad\\xff.png", "=1+2.jpg"} <= predicted
    assert reasons["mixed/pipe.jpg"].startswith("is a named pipe (FIFO)")
    assert "character device" in reasons["mixed/zeros.dcm"] and "/dev/zero" in reasons["mixed/zeros.dcm"]
    assert reasons["mixed/self.jpg"].startswith("symlink loop")
    assert reasons["mixed/gone.jpg"].startswith("dangling link") and "not found" not in reasons["mixed/gone.jpg"]
    assert reasons["mixed/notes.txt"].startswith("not an image file extension")
    assert "text file" in reasons["@SUM(A1).png"]
    assert reasons["+missing.png"] == reasons["-missing.png"] == "no such file, folder or glob match"
    for case in cases:
        name = display_name(case.path)
        if case.ok:
            assert name in predicted, (case.name, reasons.get(name))
        else:
            assert case.reason in reasons[name], (case.name, reasons[name])
            assert not case.not_in_reason or case.not_in_reason not in reasons[name], (case.name, reasons[name])
    # spreadsheet formulas neutralised in both CSVs (the raw cells, as a spreadsheet reads them)
    assert "'=1+2.jpg" in _raw_cells(out) and "=1+2.jpg" not in _raw_cells(out)
    raw_skipped = _raw_cells(Path("pred.csv.skipped.csv"))
    assert {"'@SUM(A1).png", "'+missing.png", "'-missing.png"} <= set(raw_skipped)
    assert not [c for c in raw_skipped if c[:1] in "=+-@"]
    assert "skipped mixed/pipe.jpg" in result.output and "non-image files ignored" in result.output

    strict = _invoke("predict", run_dir, "--out", "strict.csv", "--strict", "--", mixed, *named)
    assert strict.exit_code == 1, strict.output
    assert "--strict" in strict.output and len(pd.read_csv("strict.csv")) == len(table)


def test_nothing_predicted_exits_non_zero_and_strict_passes_a_clean_job(run_dir, data_root, tmp_path):
    (tmp_path / "a.png").write_text("not an image")
    nothing = _invoke("predict", run_dir, tmp_path / "a.png", tmp_path / "missing.jpg", "--out", tmp_path / "n.csv")
    assert nothing.exit_code == 1 and "nothing was predicted" in nothing.output
    assert len(pd.read_csv(str(tmp_path / "n.csv") + ".skipped.csv")) == 2
    clean = _invoke("predict", run_dir, sample_paths(data_root, 1)[0], "--out", tmp_path / "c.csv", "--strict")
    assert clean.exit_code == 0, clean.output


def test_skipped_reason_that_looks_like_a_formula_is_neutralised(loaded, data_root, tmp_path, monkeypatch):
    import covidcxr.models.predict as predict_mod
    from covidcxr.serving.batch import predict_files

    good, bad = sample_paths(data_root, 2)
    monkeypatch.setattr(predict_mod, "try_prepare", lambda path, spec, **kw: (None, "=HYPERLINK(\"x\")")
                        if path == str(bad) else (predict_mod.prepare_input(path, spec, **kw), None))
    result = predict_files(loaded, [good, bad], tmp_path / "p.csv", progress=False)
    assert result.predicted == 1 and result.skipped == [(str(bad), "=HYPERLINK(\"x\")")]
    assert "'=HYPERLINK(\"x\")" in _raw_cells(result.skipped_file)


def test_archive_member_names_that_are_not_utf8_are_written_escaped(loaded, data_root, tmp_path):
    import io
    import tarfile

    from covidcxr.serving.batch import predict_files

    image = sample_paths(data_root, 1)[0].read_bytes()
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tf:
        for name, data in (("caf\udce9.jpg", image), ("notes.t\udcfft", b"text")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    for out in (tmp_path / "p.csv", tmp_path / "p.json", tmp_path / "p.jsonl"):
        result = predict_files(loaded, [archive], out, progress=False, temp_dir=tmp_path)
        assert result.predicted == 1 and result.ignored_files[0][0] == f"{archive}::notes.t\\xfft"
        assert f"{archive}::caf\\xe9.jpg" in out.read_text(encoding="utf-8").replace("\\\\", "\\")
    assert "notes.t\\xfft" in result.skipped_file.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- requirement 3: --overwrite


def test_overwrite_csv_twice_and_old_output_kept_until_the_new_one_is_done(loaded, run_dir, data_root, tmp_path,
                                                                          monkeypatch):
    import covidcxr.models.predict as predict_mod
    from covidcxr.serving.batch import predict_files

    images = sample_paths(data_root, 3)
    out = tmp_path / "p.csv"
    assert _invoke("predict", run_dir, *images[:2], "--out", out).exit_code == 0
    for _ in range(2):
        again = _invoke("predict", run_dir, *images, "--out", out, "--overwrite")
        assert again.exit_code == 0, again.output
        assert len(pd.read_csv(out)) == 3 and len(pd.read_csv(str(out) + ".skipped.csv")) == 0
    before = out.read_bytes()

    def killed(run, good):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(predict_mod, "predict_inputs", killed)
    with pytest.raises(KeyboardInterrupt):
        predict_files(loaded, images[:1], out, overwrite=True, progress=False)
    assert out.read_bytes() == before  # the old output survives a new job that did not finish
    monkeypatch.undo()
    final = _invoke("predict", run_dir, images[0], "--out", out, "--overwrite")
    assert final.exit_code == 0, final.output
    assert pd.read_csv(out)["path"].tolist() == [str(images[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.csv.skipped.csv"]  # no journal left


# ---------------------------------------------------------------------------- requirement 4: torn rows


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_resume_cuts_a_row_torn_mid_write_and_predicts_it_again(loaded, run_dir, data_root, tmp_path, suffix):
    images = sample_paths(data_root, 3)
    out = tmp_path / f"p{suffix}"
    assert _invoke("predict", run_dir, *images, "--out", out).exit_code == 0
    whole = out.read_bytes()
    last_line = whole.rstrip(b"\n").rfind(b"\n") + 1
    out.write_bytes(whole[: last_line + (len(whole) - last_line) // 2])  # cut in the middle of the last row
    resumed = _invoke("predict", run_dir, *images, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "1 images predicted, 2 already done" in resumed.output
    read = (lambda p: pd.read_csv(p, dtype={"input_sha256": str})) if suffix == ".csv" else \
        (lambda p: pd.read_json(p, lines=True, dtype=False))
    table = read(out)
    assert table["path"].tolist() == [str(p) for p in images]
    out.write_bytes(whole)
    original = read(out)  # the same rows as the uncut output, the cut one predicted again
    pd.testing.assert_frame_equal(table.drop(columns=table.filter(like="prob_").columns),
                                  original.drop(columns=original.filter(like="prob_").columns))
    np.testing.assert_allclose(table.filter(like="prob_").to_numpy(), original.filter(like="prob_").to_numpy(),
                               atol=1e-5)


def test_resume_after_a_kill_that_tore_the_journal(loaded, data_root, tmp_path, monkeypatch):
    from covidcxr.serving.batch import journal_path, predict_files

    images = sample_paths(data_root, 4)
    out = tmp_path / "p.json"
    killed_predict_job(monkeypatch, loaded, images, out)
    journal = journal_path(out)
    data = journal.read_bytes()
    journal.write_bytes(data[: len(data) - 30])  # the second row of the batch, cut inside a quoted field
    result = predict_files(loaded, images, out, batch_size=2, progress=False, resume=True)
    assert result.already_done == 1 and result.predicted == 3
    assert [r["path"] for r in json.loads(out.read_text())] == [str(p) for p in images]
    assert not journal.exists()


# ---------------------------------------------------------------------------- requirement 5: archive cap


def test_archive_members_past_the_expansion_cap_are_skipped_and_the_job_goes_on(loaded, data_root, tmp_path):
    from covidcxr.serving.batch import predict_files

    images = sample_paths(data_root, 3)
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, image in enumerate(images):
            zf.write(image, f"{i}_{image.name}")
    cap = images[0].stat().st_size + images[1].stat().st_size  # room for the first two members only
    result = predict_files(loaded, [archive, images[2]], tmp_path / "p.csv", progress=False,
                           max_archive_bytes=cap, temp_dir=tmp_path)
    assert result.predicted == 3  # two members and the plain file
    [(path, reason)] = result.skipped
    assert path == f"{archive}::2_{images[2].name}" and "archive expansion cap" in reason
    assert pd.read_csv(result.skipped_file)["path"].tolist() == [path]
    assert _leftover(tmp_path) == []


# ---------------------------------------------------------------------------- requirement 6: temp folders


def test_temp_folder_removed_on_exit_and_exception_and_handler_restored(loaded, data_root, tmp_path, monkeypatch):
    import covidcxr.models.predict as predict_mod
    from covidcxr.serving.batch import predict_files

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(sample_paths(data_root, 1)[0], "x.jpg")
    temp = tmp_path / "tmp"
    temp.mkdir()
    seen = []

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    real = predict_mod.predict_inputs
    try:
        def records_folder(run, good):
            seen.extend(_leftover(temp))
            return real(run, good)

        monkeypatch.setattr(predict_mod, "predict_inputs", records_folder)
        assert predict_files(loaded, [archive], tmp_path / "a.csv", progress=False, temp_dir=temp).predicted == 1
        assert len(seen) == 1 and seen[0].name.startswith(f"covidcxr-predict-{os.getpid()}-")
        assert _leftover(temp) == [] and signal.getsignal(signal.SIGTERM) is mine

        def fails(run, good):
            raise RuntimeError("boom")

        monkeypatch.setattr(predict_mod, "predict_inputs", fails)
        with pytest.raises(RuntimeError):
            predict_files(loaded, [archive], tmp_path / "b.csv", progress=False, temp_dir=temp)
        assert _leftover(temp) == [] and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


_SLOW_JOB = textwrap.dedent("""
    import sys, time
    import covidcxr.models.predict as m
    from covidcxr.models.run import load_run
    from covidcxr.serving.batch import predict_files

    real, calls = m.predict_inputs, []

    def second_batch_waits(run, good):
        calls.append(1)
        if len(calls) == 2:
            print("WAITING", flush=True)
            time.sleep(120)
        return real(run, good)

    m.predict_inputs = second_batch_waits
    predict_files(load_run(sys.argv[1]), [sys.argv[2]], sys.argv[3], batch_size=1, progress=False,
                  temp_dir=sys.argv[4])
""")


def _start_slow_job(run_dir, archive: Path, out: Path, temp: Path) -> subprocess.Popen:
    """A real job on ``archive`` in a subprocess, stopped in its second batch (the first one is on disk)."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_JOB, str(run_dir), str(archive), str(out), str(temp)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 240)
    line = proc.stdout.readline() if ready else b""
    if line.strip() != b"WAITING":
        proc.kill()
        pytest.fail(f"the job did not reach its second batch: {line!r} {proc.communicate()[1][-2000:]!r}")
    return proc


@pytest.fixture()
def three_image_zip(data_root, tmp_path):
    archive = tmp_path / "three.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, image in enumerate(sample_paths(data_root, 3)):
            zf.write(image, f"{i}.jpg")
    return archive


def test_sigterm_removes_the_temp_folder_and_keeps_the_finished_batches(loaded, run_dir, three_image_zip, tmp_path):
    from covidcxr.serving.batch import journal_path, predict_files

    temp, out = tmp_path / "tmp", tmp_path / "p.csv"
    temp.mkdir()
    proc = _start_slow_job(run_dir, three_image_zip, out, temp)
    [folder] = _leftover(temp)
    assert len(list(folder.rglob("*.jpg"))) == 3  # the members, unpacked
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    assert _leftover(temp) == []
    assert len(pd.read_csv(journal_path(out))) == 1  # the first batch survives for --resume
    result = predict_files(loaded, [three_image_zip], out, resume=True, progress=False, temp_dir=temp)
    assert (result.already_done, result.predicted, result.total_rows) == (1, 2, 3)


def test_folder_left_by_kill_9_is_removed_at_the_next_start(loaded, run_dir, three_image_zip, tmp_path):
    from covidcxr.serving.batch import predict_files

    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = _start_slow_job(run_dir, three_image_zip, tmp_path / "p.csv", temp)
    proc.kill()
    proc.wait(timeout=60)
    [stale] = _leftover(temp)
    assert json.loads((stale / "owner.json").read_text())["pid"] == proc.pid
    live = temp / f"covidcxr-predict-{os.getppid()}-keep"  # a folder of a process that is still running
    live.mkdir()
    result = predict_files(loaded, [three_image_zip], tmp_path / "q.csv", progress=False, temp_dir=temp)
    assert result.predicted == 3
    assert _leftover(temp) == [live]
