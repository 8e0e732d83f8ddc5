"""DDP with torchrun on CPU (gloo, 2 processes) on real shared images: sharding, rank-0-only writes, kill + resume.

The single-process reference trains the same global batch (8 = 2 x 4) with the same seed. With
BatchNorm in eval mode (torch has no CPU SyncBatchNorm) the DDP gradient is the global batch's
mean gradient, so losses, AUC and validation probabilities agree up to the float order of the
gradient sum; agreement of the ranks with each other is checked by the job itself
(``info.distributed.ranks_in_sync``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from covidcxr.training import load_config
from covidcxr.training.distributed import ShardedBatchSampler
from covidcxr.training.loop import fit
from covidcxr.training.sampling import make_batch_sampler
from covidcxr.training.state import load_checkpoint

# model.finetune=linear keeps every BatchNorm layer in eval mode: torch has no CPU SyncBatchNorm, and
# with per-rank batch statistics the two runs would differ by more than the float order of a sum.
TINY_DDP = ["model.name=tf_efficientnet_lite0", "model.weights=none", "model.finetune=linear",
            "preprocess.image_size=48",
            "preprocess.intensity=percentile", "train.epochs=2", "train.batch_size=8", "train.samples_per_epoch=32",
            "train.lr=0.002", "train.threads=1", "train.progress=false", "train.selection_metric=auc",
            "train.patience=null", "train.sampler=source_balanced", "augment.strong_intensity=true",
            "data.validate_images=exists"]

# Installed in every process of the torchrun job (PYTHONPATH): logs each file a process opens for
# writing, or renames into place, under the watched folder - to a per-process log, never twice.
_WRITE_HOOK = '''
import os, sys
_log, _root = os.environ.get("COVIDCXR_TEST_WRITE_LOG"), os.environ.get("COVIDCXR_TEST_WATCH")
if _log and _root:
    _fd = os.open(f"{_log}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _rank = os.environ.get("RANK", "agent")
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        elif event == "os.rename":
            path, writing = args[1], True
        else:
            return
        if writing and isinstance(path, str) and os.path.abspath(path).startswith(_root):
            os.write(_fd, f"{_rank}\\t{event}\\t{os.path.abspath(path)}\\n".encode())
    sys.addaudithook(_hook)
'''


def _tiny_manifest(split_manifest, per_cell: int = 3):
    t = split_manifest.table
    keep = np.zeros(len(t), dtype=bool)
    for (_, _, split), idx in t.groupby(["label", "source", "split"]).indices.items():
        if split in ("train", "val"):
            keep[idx[: per_cell if split == "train" else 2]] = True
    return split_manifest.subset(mask=keep)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shards_are_the_global_batch_split_between_ranks():
    labels, sources = [0, 1] * 20, ["a"] * 20 + ["b"] * 20
    full = make_batch_sampler("source_balanced", labels, sources, 8, 32, seed=3)
    shards = [ShardedBatchSampler(make_batch_sampler("source_balanced", labels, sources, 8, 32, seed=3), r, 2)
              for r in (0, 1)]
    for epoch in (0, 1):
        for s in (full, *shards):
            s.set_epoch(epoch)
        got = list(zip(*[list(s) for s in shards]))
        want = list(full)
        assert len(got) == len(want) == len(full) == len(shards[0])
        for (a, b), batch in zip(got, want):
            assert len(a) == len(b) == 4 and sorted(a + b) == sorted(batch)  # (row, augmentation seed) pairs
    assert list(shards[0]) != list(shards[1])


@pytest.mark.slow
def test_torchrun_gloo_job_matches_one_process_and_only_rank0_writes(split_manifest, tmp_path):
    manifest = _tiny_manifest(split_manifest)
    path = manifest.write(tmp_path / "manifest.csv")
    overrides = TINY_DDP + [f"data.manifest={path}"]
    single = fit(load_config(None, overrides), tmp_path / "single")

    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_WRITE_HOOK)
    out, log = tmp_path / "ddp", tmp_path / "writes"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("{}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "hook"),
           "COVIDCXR_TEST_WRITE_LOG": str(log), "COVIDCXR_TEST_WATCH": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "covidcxr", "train", str(cfg), "--out", str(out), *overrides]

    # Kill the whole job (agent + both ranks) once epoch 1 is checkpointed, then resume it.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    last = out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun starts each rank in a session of its own: kill every process of the job by its pid
    # (each one opened its write log, named by pid, at start).
    for pid in [proc.pid] + [int(f.suffix[1:]) for f in tmp_path.glob("writes.*")]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = proc.communicate()[0].decode(errors="replace")
    assert last.exists(), output
    assert int(load_checkpoint(last)["epoch"]) < 2, "the job finished before it could be killed"
    assert not (out / "run.json").exists()
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("run written to") == 1  # rank 0 reports, rank 1 stays quiet

    # Rank 0 alone wrote into the run directory; the finished run's files were written once.
    writes = [line.split("\t") for f in tmp_path.glob("writes.*") for line in f.read_text().splitlines()]
    assert writes and {rank for rank, _, _ in writes} == {"0"}, sorted({(r, p) for r, _, p in writes if r != "0"})
    placed = Counter(p for _, event, p in writes if event == "os.rename")
    for name in ("run.json", "model.safetensors", "val_predictions.csv", "split.csv"):
        assert placed[str(out / name)] == 1 if name != "val_predictions.csv" else placed[str(out / name)] >= 1

    record = json.loads((out / "run.json").read_text())
    assert record["info"]["distributed"] == {"world_size": 2, "backend": "gloo", "launcher": "torchrun",
                                             "ranks_in_sync": True}
    got, want = _metrics(out), _metrics(single)
    assert [m["epoch"] for m in got] == [1, 2]
    for g, w in zip(got, want):
        assert g["processes"] == 2 and "processes" not in w
        assert g["lr"] == w["lr"] and g["train_images"] == w["train_images"] == 32
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-3)
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-3)
        assert g["val_auc"] == pytest.approx(w["val_auc"], abs=1e-6)
    assert got[1]["train_loss"] != got[0]["train_loss"]  # it trained
    # Rank 0 validated the whole val split; both models give the same probabilities.
    import pandas as pd

    a = pd.read_csv(out / "val_predictions.csv").sort_values("image")
    b = pd.read_csv(single / "val_predictions.csv").sort_values("image")
    assert list(a["image"]) == list(b["image"])
    p = [c for c in a.columns if c.startswith("p_")]
    assert p and np.allclose(a[p].to_numpy(), b[p].to_numpy(), atol=1e-4)
