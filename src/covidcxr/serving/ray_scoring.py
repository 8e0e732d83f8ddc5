"""``covidcxr predict RUN INPUTS --engine ray --out DIR``: batch scoring on a Ray cluster (Ray Data).

The same prediction path as ``covidcxr predict`` (:mod:`covidcxr.serving.batch`), spread over actors:

1. **Inputs** are expanded on the driver exactly as ``predict`` does
   (:func:`~covidcxr.serving.batch_inputs.collect_inputs`: files, folders, globs, archives), plus
   manifest CSVs (:class:`~covidcxr.data.manifest.Manifest`: their ``image`` column). Inputs that
   cannot be read, or are not images by their extension, are listed in ``DIR/skipped.csv`` with the
   reason, as in ``predict``.
2. **Scoring**: ``ray.data.from_items(paths).map_batches(RunScorer, concurrency=N)``. Each
   :class:`RunScorer` actor opens the run once (``open_run``: SHA-256 checked, torch or ONNX) and
   scores a batch with :func:`~covidcxr.models.predict.try_prepare`,
   :func:`~covidcxr.models.predict.predict_inputs` and
   :func:`~covidcxr.models.predict.records_table` - nothing is re-implemented; a file it cannot read
   comes back as a skipped row with the reason.
3. **Partitioned output with resume**: the inputs still to do are cut into partitions of
   ``partition_size``; the driver writes ``DIR/part-NNNNN.csv`` (rows) and
   ``DIR/part-NNNNN.skipped.csv`` atomically as soon as every image of a partition is back. A killed
   job loses only unfinished partitions; ``resume=True`` reads the finished ones, leaves out every
   input they hold and numbers new partitions after them, so no image is scored twice.
   ``DIR/predictions.csv`` (all partitions) and ``DIR/skipped.csv`` are written when the job ends.

Local Ray (``ray.init()``) by default; ``address="auto"`` or ``ray://host:10001`` joins an existing
cluster, whose workers must see the run directory and the inputs at the same paths (shared storage;
archives are unpacked under ``temp_dir``, which must then be shared too).
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from covidcxr.data.plausibility import DEFAULT_CHECKS, InputChecks
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import write_csv, write_json
from covidcxr.serving.batch_inputs import MAX_ARCHIVE_BYTES, Inputs, collect_inputs, extraction_folder
from covidcxr.serving.batch_output import SKIPPED_COLUMNS

JOB_FILE = "job.json"
PART_PATTERN = re.compile(r"^part-(\d{5})\.csv$")
SKIP_REASON = "skip_reason"  # column of an actor's output: empty for a predicted image


class RunScorer:
    """A Ray actor: one opened run, scoring batches of ``{"path", "name"}`` rows (pandas batches)."""

    def __init__(self, run_dir: str, backend: str = "torch", threads: int = 1, allow_non_frontal: bool = False,
                 checks: InputChecks | None = DEFAULT_CHECKS):
        import torch

        from covidcxr.serving.onnx import open_run

        torch.set_num_threads(max(1, threads))
        kwargs = {"threads": threads} if backend == "onnx" else {}
        self.run = open_run(run_dir, backend, **kwargs)
        self.options = {"allow_non_frontal": allow_non_frontal, "checks": checks}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from covidcxr.models.predict import predict_inputs, records_table, try_prepare

        loaded = [try_prepare(p, self.run.spec, lung_finder=self.run.lung_finder, **self.options)
                  for p in batch["path"]]
        good = [x for x, _ in loaded if x is not None]
        name_of = dict(zip(batch["path"], batch["name"]))
        rows = records_table(self.run, predict_inputs(self.run, good))
        rows["path"] = [name_of[p] for p in rows["path"]]
        rows["backend"] = self.run.backend
        rows[SKIP_REASON] = ""
        bad = pd.DataFrame({"path": [n for n, (x, _) in zip(batch["name"], loaded) if x is None],
                            SKIP_REASON: [r for x, r in loaded if x is None]})
        out = pd.concat([rows, bad], ignore_index=True) if len(bad) else rows
        out["partition"] = out["path"].map(dict(zip(batch["name"], batch["partition"])))
        return out


@dataclass
class RayScoringResult:
    out_dir: Path
    predicted: int  # images scored by this invocation
    already_done: int  # inputs found in finished partitions (resume)
    skipped: list[tuple[str, str]]  # (name, reason) this invocation
    partitions_written: int
    partitions_total: int
    total_rows: int
    seconds: float
    actors: int

    @property
    def images_per_second(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else float("nan")


def expand_manifests(paths: Sequence[str | Path]) -> list[str]:
    """Inputs with every manifest CSV replaced by its image paths (resolved against the CSV's folder)."""
    from covidcxr.data.manifest import Manifest

    expanded: list[str] = []
    for p in map(str, paths):
        if p.lower().endswith(".csv") and Path(p).is_file():
            expanded.extend(str(x) for x in Manifest.read(p).image_paths())
        else:
            expanded.append(p)
    return expanded


def finished_partitions(out_dir: Path) -> dict[int, tuple[pd.DataFrame, pd.DataFrame]]:
    """``{k: (rows, skipped)}`` of every partition a (possibly killed) job wrote completely."""
    found = {}
    for f in sorted(out_dir.glob("part-*.csv")):
        m = PART_PATTERN.match(f.name)
        skipped = f.with_name(f"part-{m.group(1)}.skipped.csv") if m else None
        if m and skipped.is_file():  # the skipped file is written last: both present = finished
            found[int(m.group(1))] = (pd.read_csv(f, dtype={"path": str}, keep_default_na=False),
                                      pd.read_csv(skipped, dtype=str, keep_default_na=False))
    return found


def _open_job(out_dir: Path, run_sha256: str, *, resume: bool, overwrite: bool) -> dict:
    job_file = out_dir / JOB_FILE
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    if job_file.exists() and not resume and not overwrite:
        raise CovidCXRError(f"{out_dir} holds a scoring job; pass --resume to continue it or --overwrite to start again")
    if job_file.exists() and overwrite:
        for f in out_dir.glob("part-*.csv"):
            f.unlink()
    if resume and job_file.exists():
        job = json.loads(job_file.read_text())
        if job.get("model_sha256") != run_sha256:
            raise CovidCXRError(f"{out_dir}: holds predictions of another model; resume with the same run directory "
                                "or write to a new --out")
        return job
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {"model_sha256": run_sha256, "engine": "ray"}
    write_json(job_file, job)
    return job


def _init_ray(address: str | None, actors: int):
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a private local instance: one CPU per actor plus one for the driver's reading
            ray.init(num_cpus=actors + 1, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def score_with_ray(run_dir: str | Path, paths: Sequence[str | Path], out_dir: str | Path, *, actors: int = 2,
                   batch_size: int = 16, partition_size: int = 256, backend: str = "torch", resume: bool = False,
                   overwrite: bool = False, address: str | None = None, threads_per_actor: int = 1,
                   allow_non_frontal: bool = False, checks: InputChecks | None = DEFAULT_CHECKS,
                   max_archive_bytes: int = MAX_ARCHIVE_BYTES, temp_dir: str | Path | None = None,
                   stop_after_partitions: int | None = None) -> RayScoringResult:
    """Score ``paths`` with ``actors`` Ray actors into the partitioned folder ``out_dir`` (module docstring).

    ``stop_after_partitions`` ends the job after that many partitions (what a kill leaves, for tests).
    """
    import time

    from covidcxr.models.record import read_run_record

    if actors < 1 or batch_size < 1 or partition_size < 1:
        raise ConfigError("actors, batch_size and partition_size must be >= 1")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    run_sha256 = read_run_record(run_dir).model_sha256
    _open_job(out_dir, run_sha256, resume=resume, overwrite=overwrite)
    done = finished_partitions(out_dir)
    done_names = {str(p) for rows, skipped in done.values() for p in [*rows["path"], *skipped["path"]]}
    with ExitStack() as stack:
        extract_dir = stack.enter_context(extraction_folder(temp_dir))
        inputs: Inputs = collect_inputs(expand_manifests(paths), extract_dir, max_archive_bytes=max_archive_bytes)
        todo = [p for p in inputs.files if inputs.name(p) not in done_names]
        listed = [m for m in inputs.missing + inputs.ignored if m[0] not in done_names]
        first = max(done, default=-1) + 1
        items = [{"path": str(p), "name": inputs.name(p), "partition": first + i // partition_size}
                 for i, p in enumerate(todo)]
        expected = pd.Series([it["partition"] for it in items]).value_counts().to_dict() if items else {}
        written, skipped_now, predicted = 0, [], 0
        if items:
            ray = _init_ray(address, actors)
            ds = ray.data.from_items(items).map_batches(
                RunScorer, batch_size=batch_size, batch_format="pandas", num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=actors),
                fn_constructor_kwargs={"run_dir": str(run_dir), "backend": backend, "threads": threads_per_actor,
                                       "allow_non_frontal": allow_non_frontal, "checks": checks})
            pending: dict[int, list[pd.DataFrame]] = {}
            for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
                for k, part in batch.groupby("partition"):
                    pending.setdefault(int(k), []).append(part)
                    if sum(len(x) for x in pending[int(k)]) == expected[int(k)]:
                        rows, bad = _write_partition(out_dir, int(k), pd.concat(pending.pop(int(k))))
                        predicted += len(rows)
                        skipped_now.extend(bad)
                        written += 1
                if stop_after_partitions is not None and written >= stop_after_partitions:
                    break
            if pending and (stop_after_partitions is None or written < stop_after_partitions):
                raise CovidCXRError(f"the Ray job returned incomplete partitions {sorted(pending)}; run again with "
                                    "--resume")
        finished = stop_after_partitions is None or written < stop_after_partitions
        if finished:
            _write_totals(out_dir, listed + [m for m in done_missing(out_dir) if m not in listed])
    all_done = finished_partitions(out_dir)
    return RayScoringResult(out_dir=out_dir, predicted=predicted, already_done=len(done_names),
                            skipped=skipped_now + listed, partitions_written=written, partitions_total=len(all_done),
                            total_rows=sum(len(r) for r, _ in all_done.values()),
                            seconds=time.perf_counter() - started, actors=actors)


def _write_partition(out_dir: Path, k: int, part: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Rows first, the skipped list last (its presence marks the partition finished); both atomic."""
    part = part.sort_values("path", kind="stable")
    good = part[part[SKIP_REASON] == ""].drop(columns=[SKIP_REASON, "partition"])
    bad = part[part[SKIP_REASON] != ""]
    write_csv(out_dir / f"part-{k:05d}.csv", good)
    write_csv(out_dir / f"part-{k:05d}.skipped.csv",
              pd.DataFrame({"path": bad["path"].astype(str), "reason": bad[SKIP_REASON].astype(str)}))
    return good, list(zip(bad["path"].astype(str), bad[SKIP_REASON].astype(str)))


def done_missing(out_dir: Path) -> list[tuple[str, str]]:
    """Inputs listed as skipped before reading (missing / ignored) by an earlier invocation of the job."""
    f = out_dir / "inputs.skipped.csv"
    if not f.is_file():
        return []
    t = pd.read_csv(f, dtype=str, keep_default_na=False)
    return list(zip(t["path"], t["reason"]))


def _write_totals(out_dir: Path, listed: list[tuple[str, str]]) -> None:
    """``predictions.csv`` (every partition, in partition order) and ``skipped.csv`` (as ``predict``'s)."""
    parts = finished_partitions(out_dir)
    rows = [parts[k][0] for k in sorted(parts)]
    write_csv(out_dir / "inputs.skipped.csv", pd.DataFrame(listed, columns=SKIPPED_COLUMNS))
    skipped = pd.concat([pd.DataFrame(listed, columns=SKIPPED_COLUMNS)] + [parts[k][1] for k in sorted(parts)],
                        ignore_index=True)
    write_csv(out_dir / "predictions.csv", pd.concat(rows, ignore_index=True) if rows else pd.DataFrame())
    write_csv(out_dir / "skipped.csv", skipped.reindex(columns=SKIPPED_COLUMNS))
