"""``covidcxr predict RUN_DIR PATHS... --out predictions.csv``: batch prediction over files, folders and archives.

Inputs are files, folders (walked recursively), glob patterns and ``.zip`` / ``.tar[.gz|.bz2|.xz]``
archives (members are read from a private temporary folder and reported as ``archive.zip::member``);
see :mod:`covidcxr.serving.batch_inputs`. The format of each file is decided by its content
(:func:`covidcxr.data.read_xray`), not its extension; while walking folders, files whose extension
says they are something else (``.txt``, ``.csv``, ...) are not offered to the model.

No input vanishes: each one is either predicted (a row of ``out``) or listed with the reason in
``<out>.skipped.csv`` - unreadable files, FIFOs, devices, symlink loops, dangling links, missing
paths, archive members past the caps and (as "ignored") files without an image extension.

Rows are appended to a journal (``<out>.partial.csv``) flushed to disk after every batch, so a job
that is killed loses at most the batch in flight; ``resume=True`` skips every input already in the
output (or in its skipped list), cutting off a row torn mid-write. The final file is CSV, JSON (list
of records), JSON Lines or Parquet, chosen by the extension of ``out``, written atomically when the
job ends (see :mod:`covidcxr.serving.batch_output`): ``overwrite=True`` replaces an old output only
with a finished new one.
"""

from __future__ import annotations

from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from covidcxr.data.plausibility import DEFAULT_CHECKS, InputChecks
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import write_csv
from covidcxr.models.predict import Predictor
from covidcxr.serving.batch_inputs import (ARCHIVE_SEPARATOR, ARCHIVE_SUFFIXES, IMAGE_SUFFIXES,  # noqa: F401
                                           MAX_ARCHIVE_BYTES, MAX_MEMBER_BYTES, Inputs, collect_inputs,
                                           display_name, extraction_folder)
from covidcxr.serving.batch_output import (OUTPUT_FORMATS, SKIPPED_COLUMNS, CsvJournal,  # noqa: F401
                                           journal_path, output_format, read_output, skipped_journal_path,
                                           skipped_path)


@dataclass
class BatchResult:
    """What ``predict_files`` did: the output files and the counts a user wants to see."""

    out: Path
    skipped_file: Path
    predicted: int  # rows written in this invocation
    already_done: int  # inputs skipped because --resume found them in the output
    skipped: list[tuple[str, str]]  # (path, reason) this invocation: unreadable, missing, refused
    ignored: int  # folder / archive files that are not images by their extension (listed in skipped_file too)
    total_rows: int  # rows in the final output
    total_skipped: int = 0  # rows in the final skipped_file (all invocations; ignored files included)
    ignored_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) this invocation

    @property
    def inputs(self) -> int:
        """Inputs this invocation met: predicted, already done, skipped or ignored."""
        return self.predicted + self.already_done + len(self.skipped) + len(self.ignored_files)


def _check_model(table: pd.DataFrame, path: Path, model_sha256: str) -> None:
    if "model_sha256" in table and len(table) and set(table["model_sha256"].astype(str)) != {model_sha256}:
        raise CovidCXRError(f"{path}: holds predictions of another model (model_sha256 "
                            f"{sorted(set(table['model_sha256'].astype(str)))[0][:12]}...); "
                            "resume with the same run directory or write to a new --out")


def _open_journals(out: Path, columns: list[str], *, resume: bool, model_sha256: str):
    """The rows and skipped journals. Resuming, an existing journal is continued (it is the killed job's,
    authoritative even beside an older ``out``); without one, they are seeded from the finished outputs."""
    rows_j, skipped_j, skipped_file = journal_path(out), skipped_journal_path(out), skipped_path(out)
    seed_rows = seed_skipped = None
    if resume and not rows_j.exists():
        if out.exists():
            seed_rows = read_output(out)
            _check_model(seed_rows, out, model_sha256)
            if "path" in seed_rows:
                seed_rows["path"] = seed_rows["path"].astype(str)
        if skipped_file.exists():
            seed_skipped = read_output(skipped_file)
    continuing = resume and rows_j.exists()
    rows_out = CsvJournal(rows_j, columns, fresh=not continuing, seed=seed_rows)
    try:
        _check_model(rows_out.rows, rows_j, model_sha256)
        skipped_out = CsvJournal(skipped_j, SKIPPED_COLUMNS, fresh=not continuing, seed=seed_skipped)
    except BaseException:
        rows_out.close()
        raise
    return rows_out, skipped_out


def predict_files(run: Predictor, paths: Sequence[str | Path], out: str | Path, *, batch_size: int = 16,
                  resume: bool = False, overwrite: bool = False, heatmaps: str | Path | None = None,
                  cam_run: Predictor | None = None, progress: bool = True, workers: int = 2,
                  allow_non_frontal: bool = False, checks: InputChecks | None = DEFAULT_CHECKS,
                  max_archive_bytes: int = MAX_ARCHIVE_BYTES, temp_dir: str | Path | None = None) -> BatchResult:
    """Predict every image in ``paths`` with ``run`` and write one row per image to ``out``.

    Columns: ``path``, ``prob_<class>`` per class, ``predicted`` (at the run's stored threshold),
    ``threshold``, ``input_sha256``, ``model_sha256``, ``backend`` (and ``heatmap`` with
    ``heatmaps=DIR``: a Grad-CAM overlay PNG per image, computed on ``cam_run`` - the PyTorch model -
    when ``run`` is an ONNX backend). ``resume=True`` continues a killed job; without it an
    existing ``out`` is refused unless ``overwrite=True``. ``checks``: the plausibility gate
    (:class:`~covidcxr.data.plausibility.InputChecks`, ``None`` = off). Archive members are unpacked under
    ``temp_dir`` (default: the system's), at most ``max_archive_bytes`` per job.
    """
    from covidcxr.models.predict import predict_paths

    out = Path(out)
    write_final, _ = output_format(out)
    skipped_file = skipped_path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    existing = [p for p in (out, journal_path(out), skipped_file, skipped_journal_path(out))
                if p.exists() or p.is_symlink()]
    if existing and not resume and not overwrite:
        raise CovidCXRError(f"{existing[0]} exists; pass --resume to continue that job or --overwrite to start again")
    out.parent.mkdir(parents=True, exist_ok=True)
    heat_dir = Path(heatmaps) if heatmaps is not None else None
    backend = run.backend
    columns = ["path", *[f"prob_{c}" for c in run.classes], "predicted", "threshold", "input_sha256",
               "model_sha256", "backend"] + (["heatmap"] if heat_dir is not None else [])

    with ExitStack() as stack:
        extract_dir = stack.enter_context(extraction_folder(temp_dir))
        rows_out, skipped_out = _open_journals(out, columns, resume=resume, model_sha256=run.model_sha256)
        stack.enter_context(closing(rows_out))
        stack.enter_context(closing(skipped_out))
        done_rows = set(rows_out.rows["path"].astype(str))
        done = done_rows | set(skipped_out.rows["path"].astype(str))
        inputs = collect_inputs(paths, extract_dir, max_archive_bytes=max_archive_bytes)
        todo = [p for p in inputs.files if inputs.name(p) not in done]
        skipped = [m for m in inputs.missing if m[0] not in done]
        ignored = [m for m in inputs.ignored if m[0] not in done]
        skipped_out.append(skipped + ignored)
        counter = {"rows": 0}
        if heat_dir is not None:
            from covidcxr.serving.heatmap import HeatmapWriter

            heat_writer = HeatmapWriter(cam_run if cam_run is not None else run, heat_dir)

        def on_batch(records, rows: pd.DataFrame, bad: list[tuple[str, str]]) -> None:
            rows = rows.copy()
            if heat_dir is not None and len(rows):
                # Drawn from the inputs the prediction used: no file is decoded twice.
                rows["heatmap"] = heat_writer.write(records, [inputs.name(r.path) for r in records])
            rows["path"] = [inputs.name(p) for p in rows["path"]]
            rows["backend"] = backend
            rows_out.append(rows.reindex(columns=columns).itertuples(index=False, name=None))
            named_bad = [(inputs.name(p), display_name(reason)) for p, reason in bad]
            skipped_out.append(named_bad)
            skipped.extend(named_bad)
            counter["rows"] += len(rows)

        if todo:
            predict_paths(run, todo, batch_size=batch_size, progress=progress, workers=workers, on_batch=on_batch,
                          allow_non_frontal=allow_non_frontal, checks=checks)

    # The job is finished: replace the outputs (atomically) and only then drop the journals.
    table, skipped_table = rows_out.table(), skipped_out.table()
    write_csv(skipped_file, skipped_table)
    write_final(table, out)
    rows_out.path.unlink(missing_ok=True)
    skipped_out.path.unlink(missing_ok=True)
    return BatchResult(out=out, skipped_file=skipped_file, predicted=counter["rows"],
                       already_done=sum(inputs.name(p) in done_rows for p in inputs.files), skipped=skipped,
                       ignored=len(ignored), total_rows=len(table), total_skipped=len(skipped_table),
                       ignored_files=ignored)


def predict_run(run_dir: str | Path, paths: Sequence[str | Path], out: str | Path, *, backend: str = "torch",
                heatmaps: str | Path | None = None, **kwargs) -> BatchResult:
    """``covidcxr predict``: open ``run_dir`` on ``backend`` (SHA-256 checked) and run :func:`predict_files`."""
    from covidcxr.models.run import load_run
    from covidcxr.serving.onnx import open_run

    run = open_run(run_dir, backend)
    cam_run = None
    if heatmaps is not None and backend != "torch":
        cam_run = load_run(run_dir)  # Grad-CAM needs gradients, i.e. the PyTorch model
    return predict_files(run, paths, out, heatmaps=heatmaps, cam_run=cam_run, **kwargs)
