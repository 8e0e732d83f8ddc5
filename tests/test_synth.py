"""CycleGAN (`covidcxr synth`) on real shared images at 64 px: published architecture, a run directory with
sealed record and weights, bit-identical resume after a kill, synthetic manifest rows, and the rule that
synthetic images are training-only (manifest, split, audit, training rows)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from covidcxr.cli import app
from covidcxr.errors import ConfigError, CovidCXRError, ManifestError, WeightsError

pytestmark = pytest.mark.slow

#: 64 px, 8-filter networks with 2 residual blocks, 8 images per domain, 10 steps: a few seconds on one core.
TINY = ["image_size=64", "working_size=128", "ngf=8", "ndf=8", "n_blocks=2", "max_images=8", "steps=10",
        "log_every=2", "sample_every=5", "checkpoint_every=3", "threads=1", "progress=false", "pool_size=3"]
CONFIG = {"domain_a": {"name": "normal", "filter": {"label": "normal"}},
          "domain_b": {"name": "covid", "filter": {"label": "covid"}}}


@pytest.fixture(scope="module")
def split_csv(split_manifest, tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "split.csv"
    split_manifest.write(path)
    return path


@pytest.fixture(scope="module")
def config_file(split_csv):
    import yaml

    path = split_csv.parent / "synth.yaml"
    path.write_text(yaml.safe_dump({"manifest": str(split_csv), **CONFIG}))
    return path


@pytest.fixture(scope="module")
def tiny_run(config_file):
    run = config_file.parent / "run"
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["synth", "train", str(config_file), "--out", str(run),
                                      *[a for kv in TINY for a in ("--set", kv)]], catch_exceptions=False)
    torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "CycleGAN normal <-> covid: 10 steps" in result.output
    return run


def test_networks_are_the_published_cyclegan():
    from covidcxr.models.cyclegan import PatchDiscriminator, ResnetGenerator, default_blocks, receptive_field

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # The reference implementation prints 11.378 M (resnet_9blocks G) and 2.765 M (basic D) for RGB; with one
    # grey channel in and out the first / last convs shrink by 6,272 + 6,274 (G) and 2,048 (D) weights.
    assert count(ResnetGenerator(3, 64, 9)) == 11_378_179 and count(ResnetGenerator(1, 64, 9)) == 11_365_633
    assert count(PatchDiscriminator(3, 64, 3)) == 2_764_737 and count(PatchDiscriminator(1, 64, 3)) == 2_762_689
    assert receptive_field(3) == 70 and default_blocks(256) == 9 and default_blocks(128) == 6
    x = torch.zeros(2, 1, 64, 64)
    assert ResnetGenerator(1, 8, 2)(x).shape == x.shape
    assert PatchDiscriminator(1, 8, 3)(x).shape == (2, 1, 6, 6)


def test_run_directory_records_domains_spec_and_generator_hashes(tiny_run):
    from covidcxr.models.cyclegan import load_generator, read_synth_record
    from covidcxr.models.weights import sha256_file

    record = read_synth_record(tiny_run)
    assert record.history["steps_done"] == 10 and record.integrity.record_sha256
    assert (record.ngf, record.n_blocks, record.ndf, record.n_layers) == (8, 2, 8, 3)
    spec = record.preprocess
    assert (spec.image_size, spec.channels, spec.mean, spec.std, spec.intensity) == (64, 1, (0.5,), (0.5,), "none")
    for d in ("a2b", "b2a"):
        assert record.generators[d].sha256 == sha256_file(tiny_run / f"generator_{d}.safetensors")
    domains = pd.read_csv(tiny_run / "domains.csv")
    assert set(domains["split"]) == {"train"}  # the GAN never sees val / test patients
    assert domains.groupby("domain")["label"].agg(set).to_dict() == {"a": {"normal"}, "b": {"covid"}}
    losses = pd.read_csv(tiny_run / "losses.csv")
    assert losses["step"].tolist() == [2, 4, 6, 8, 10]
    assert np.isfinite(losses[["g_total", "cycle_a", "d_a", "d_b", "images_per_s"]].to_numpy()).all()
    assert losses["lr"].iloc[0] == pytest.approx(2e-4) and losses["lr"].iloc[-1] < 2e-4  # second half decays
    assert sorted(p.name for p in (tiny_run / "samples").iterdir()) == ["step_000005.png", "step_000010.png"]
    assert (tiny_run / "losses.png").stat().st_size > 1000
    gen = load_generator(tiny_run, "a2b")
    out = gen.translate([np.random.default_rng(0).random((90, 120)).astype(np.float32)])[0]
    assert out.shape == (48, 64) and 0 <= out.min() and out.max() <= 1  # source aspect, longer side 64


def test_edited_record_or_generator_is_refused(tiny_run, tmp_path):
    from covidcxr.models.cyclegan import load_generator

    edited = tmp_path / "edited"
    shutil.copytree(tiny_run, edited)
    raw = json.loads((edited / "run.json").read_text())
    raw["domains"]["b"]["name"] = "pneumonia"
    (edited / "run.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match="domains"):
        load_generator(edited)
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_run, swapped)
    shutil.copyfile(swapped / "generator_b2a.safetensors", swapped / "generator_a2b.safetensors")
    with pytest.raises(WeightsError, match="SHA-256"):
        load_generator(swapped, "a2b")


class _Killed(BaseException):
    pass


def test_resume_after_a_kill_is_bit_identical(tiny_run, config_file, monkeypatch):
    from covidcxr.models.weights import sha256_file
    from covidcxr.training.synth import train as train_mod
    from covidcxr.training.synth.config import load_synth_config

    cfg = load_synth_config(config_file, TINY)
    out = config_file.parent / "killed"
    real = train_mod.save_checkpoint

    def save_then_die(path, state):
        real(path, state)
        if state["step"] == 6:
            raise _Killed("SIGKILL after the step-6 checkpoint")

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_mod.train_synth(cfg, out)
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    assert not (out / "run.json").exists() and (out / "checkpoints" / "last.pt").exists()
    with pytest.raises(CovidCXRError, match="--resume"):
        train_mod.train_synth(cfg, out)
    with pytest.raises(CovidCXRError, match="another configuration"):
        train_mod.train_synth(load_synth_config(config_file, TINY + ["lr=0.001"]), out, resume=True)
    record = train_mod.train_synth(cfg, out, resume=True)
    assert record.info["resumed_at"] == [6]
    for d in ("a2b", "b2a"):  # the killed + resumed run ends exactly where the uninterrupted one did
        assert sha256_file(out / f"generator_{d}.safetensors") == sha256_file(tiny_run / f"generator_{d}.safetensors")
    assert pd.read_csv(out / "losses.csv").equals(pd.read_csv(tiny_run / "losses.csv").assign(
        images_per_s=pd.read_csv(out / "losses.csv")["images_per_s"]))


def test_generate_writes_flagged_rows_with_provenance(tiny_run, split_csv, tmp_path):
    from covidcxr.data.io import read_xray
    from covidcxr.data.manifest import Manifest
    from covidcxr.models.cyclegan import read_synth_record

    out = tmp_path / "gen"
    result = CliRunner().invoke(app, ["synth", "generate", str(tiny_run), "--manifest", str(split_csv), "--out", str(out),
                                      "--filter", "label=normal", "--filter", "split=train", "--max", "3"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    synth = Manifest.read(out / "manifest.csv")
    source = Manifest.read(split_csv)
    t = synth.table
    assert len(t) == 3 and set(t["synthetic"]) == {"true"} and set(t["label"]) == {"covid"}
    assert set(t["generator_sha256"]) == {read_synth_record(tiny_run).generators["a2b"].sha256}
    assert (t["patient_id"] == t["source_patient_id"]).all() and set(t["split"]) == {"train"}
    by_image = {str(p.resolve()): r for p, r in zip(source.image_paths(), source.table.itertuples())}
    from covidcxr.paths import data_root

    for row, path in zip(t.itertuples(), synth.image_paths()):
        src = by_image[str((data_root() / row.source_image).resolve())]
        assert src.patient_id == row.patient_id and src.label == "normal" and src.split == "train"
        h, w = read_xray(path, checks=None).pixels.shape
        sh, sw = read_xray(data_root() / row.source_image).pixels.shape
        assert max(h, w) == 64 and abs(h / w - sh / sw) < 0.05
    result = CliRunner().invoke(app, ["synth", "generate", str(tiny_run), "--manifest", str(split_csv),
                                      "--out", str(tmp_path / "held"), "--filter", "label=normal", "--max", "40"])
    assert result.exit_code != 0 and "training-only" in str(result.exception)
    assert not (tmp_path / "held" / "manifest.csv").exists()


def _synthetic_rows(split_manifest, split: str | None, n: int = 2) -> pd.DataFrame:
    t = split_manifest.table
    src = t[((t["split"] == split) if split else True) & (t["label"] == "normal")].head(n)
    return src.assign(image=[f"synth/{i}.png" for i in range(n)], label="covid", synthetic="true",
                      generator_sha256="0" * 64, source_image=src["image"].to_numpy(),
                      source_patient_id=src["patient_id"].to_numpy())


def test_synthetic_images_are_refused_outside_train(split_manifest):
    from covidcxr.data.audit import audit_manifest
    from covidcxr.data.manifest import Manifest
    from covidcxr.data.splits import assign_splits

    for split in ("val", "test", "external"):
        rows = _synthetic_rows(split_manifest, "train").assign(split=split)
        with pytest.raises(ManifestError, match="training only"):
            Manifest(pd.concat([split_manifest.table, rows]), root=split_manifest.root)
    moved = _synthetic_rows(split_manifest, "train").assign(patient_id="nih:someone-else")
    with pytest.raises(ManifestError, match="source patient"):
        Manifest(pd.concat([split_manifest.table, moved]), root=split_manifest.root)
    # A split that would put a synthetic image's patient in val / test is refused ...
    many = _synthetic_rows(split_manifest, None, n=40).assign(split="")  # 40 patients: some land in val / test
    with pytest.raises(ManifestError, match="training-only"):
        assign_splits(Manifest(pd.concat([split_manifest.table, many]).assign(split=""), root=split_manifest.root), seed=0)
    unsplit = pd.concat([split_manifest.table, _synthetic_rows(split_manifest, "test").assign(split="")])
    # ... and the audit flags one whose patient's real images are held out.
    report = audit_manifest(Manifest(unsplit, root=split_manifest.root), duplicates=False)
    names = {f.check: f.severity for f in report.findings}
    assert names["synthetic_images"] == "info" and names["synthetic_from_held_out_patient"] == "error"
    ok = audit_manifest(Manifest(pd.concat([split_manifest.table, _synthetic_rows(split_manifest, "train")]),
                                 root=split_manifest.root), duplicates=False)
    assert "synthetic_from_held_out_patient" not in {f.check for f in ok.findings}


def test_training_adds_synthetic_rows_to_train_only(split_manifest, tmp_path):
    from covidcxr.data.manifest import Manifest
    from covidcxr.training import load_config
    from covidcxr.training.rows import prepare_training_data

    base = prepare_training_data(load_config(None, []), manifest=split_manifest)
    path = tmp_path / "synthetic.csv"
    Manifest(_synthetic_rows(split_manifest, "train", n=5), root=tmp_path).write(path)
    cfg = load_config(None, [f"data.synthetic_manifest={path}", "data.synthetic_max=3"])
    data = prepare_training_data(cfg, manifest=split_manifest)
    assert data.train_mask.sum() == base.train_mask.sum() + 3 and data.val_mask.sum() == base.val_mask.sum()
    split = data.run_split("split")
    added = data.manifest.table["synthetic"] == "true"
    assert added.sum() == 3 and set(split[added.to_numpy()]) == {"train"}
    assert (split == "test").sum() == (base.run_split("split") == "test").sum()
    assert data.split_info["synthetic"]["rows_added"] == 3 and data.split_info["synthetic"]["rows_available"] == 5
    leaky = tmp_path / "leaky.csv"
    Manifest(_synthetic_rows(split_manifest, "val").assign(split=""), root=tmp_path).write(leaky)
    with pytest.raises(ConfigError, match="not training patients"):
        prepare_training_data(load_config(None, [f"data.synthetic_manifest={leaky}"]), manifest=split_manifest)
    real = tmp_path / "real.csv"
    split_manifest.subset("train").write(real)
    with pytest.raises(ConfigError, match="not flagged synthetic"):
        prepare_training_data(load_config(None, [f"data.synthetic_manifest={real}"]), manifest=split_manifest)


def test_bad_synth_config_names_the_key(config_file):
    from covidcxr.training.synth.config import load_synth_config

    with pytest.raises(ConfigError, match="unknown key"):
        load_synth_config(config_file, ["stepz=3"])
    with pytest.raises(ConfigError, match="same filter"):
        load_synth_config(None, ["domain_a={name: x, filter: {label: covid}}", "domain_b={name: y, filter: {label: covid}}"])
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_synth_config(config_file, ["image_size=66", "working_size=128"])


# ---------------------------------------------------------------- counterfactual shortcut test

NIH, RSNA = "muhammedtalo/COVID-19", "rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS"


@pytest.fixture(scope="module")
def counterfactual_runs(split_manifest, split_csv, tmp_path_factory):
    """A tiny binary classifier (48 px, random init, 2 short epochs) and a tiny NIH <-> RSNA normals CycleGAN."""
    from covidcxr.training import load_config
    from covidcxr.training.loop import fit
    from covidcxr.training.synth.config import load_synth_config
    from covidcxr.training.synth.train import train_synth

    t = split_manifest.table
    keep = np.zeros(len(t), dtype=bool)
    for (_, _, split), idx in t.groupby(["label", "source", "split"]).indices.items():
        keep[idx[: {"train": 3, "val": 2, "test": 4}[split]]] = True
    folder = tmp_path_factory.mktemp("counterfactual")
    threads = torch.get_num_threads()
    cls = fit(load_config(None, ["model.weights=none", "preprocess.image_size=48", "preprocess.intensity=percentile",
                                 "train.epochs=2", "train.batch_size=8", "train.samples_per_epoch=16", "train.threads=1",
                                 "train.progress=false", "train.selection_metric=auc", "data.validate_images=exists"]),
              folder / "classifier", manifest=split_manifest.subset(mask=keep))
    gan = folder / "gan"
    train_synth(load_synth_config(None, [f"manifest={split_csv}", f"domain_a={{name: nih, filter: {{label: normal, source: '{NIH}'}}}}",
                                         f"domain_b={{name: rsna, filter: {{label: normal, source: '{RSNA}'}}}}", *TINY[:-4],
                                         "steps=4", "threads=1", "progress=false"]), gan)
    torch.set_num_threads(threads)
    return cls, gan


def test_counterfactual_shift_measures_the_translated_test_images(counterfactual_runs, monkeypatch):
    from covidcxr.evaluation.counterfactual import counterfactual_shift, scorecard_line
    from covidcxr.models.cyclegan import LoadedGenerator

    cls, gan = counterfactual_runs
    split = pd.read_csv(cls / "split.csv")
    nih_test = split[(split["split"] == "test") & (split["source"] == NIH) & (split["label"] == "normal")]
    out = cls.parent / "counterfactual.json"
    cli = CliRunner().invoke(app, ["synth", "counterfactual", str(cls), str(gan), "--json", str(out)], catch_exceptions=False)
    assert cli.exit_code == 0 and "counterfactual nih -> rsna" in cli.output, cli.output
    result = json.loads(out.read_text())
    assert result["translation"] == "nih -> rsna" and result["n_translated"] == len(nih_test) == 4
    t = result["translated"]
    assert t["mean_abs_delta"] > 0 and 0 <= t["flip_share"] <= 1 and t["flips"] == round(t["flip_share"] * 4)
    assert {"round_trip", "resampled"} <= set(result) and result["auc_original"]["n"] == result["n_split"]
    assert scorecard_line(result).startswith("counterfactual nih -> rsna (4 test images): mean |dP|")
    # A generator that changes nothing must move nothing: the test's own wiring, checked.
    monkeypatch.setattr(LoadedGenerator, "translate", lambda self, images, **kw: [np.array(i) for i in images])
    same = counterfactual_shift(cls, gan, n_boot=200)
    for name in ("translated", "round_trip"):
        # (batches of another size round differently in the last float32 bits)
        assert same[name]["mean_abs_delta"] < 1e-5 and same[name]["flips"] == 0
        assert same[name]["auc"]["value"] == pytest.approx(same["auc_original"]["value"], abs=1e-9)


# ---------------------------------------------------------------- building blocks

def test_image_pool_keeps_the_last_fakes_and_round_trips_through_a_checkpoint():
    from covidcxr.training.synth.objectives import ImagePool, linear_decay

    pool, rng = ImagePool(3), np.random.default_rng(0)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first, rng), first)  # filling: the new images come straight back
    seen = {0.0, 1.0, 2.0}
    for k in range(3, 40):
        out = float(pool.query(torch.full((1, 1, 1, 1), float(k)), rng))
        assert out == k or out in seen  # either the new image or one stored earlier
        seen.add(float(k))
    clone = ImagePool(0)
    clone.load_state_dict(pool.state_dict())
    assert clone.size == 3 and all(torch.equal(a, b) for a, b in zip(clone.images, pool.images))
    assert [linear_decay(s, 10, 4) for s in (0, 5, 6, 9)] == [1.0, 1.0, pytest.approx(0.8), pytest.approx(0.2)]


def test_frechet_distance_and_kid_on_known_samples(data_root):
    from covidcxr.evaluation.realism import frechet_distance, kernel_inception_distance, nearest_hash_distances

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    assert frechet_distance(x, y) < 0.02
    # mean shifted by 2 in every dimension, variance 4x (std 2): |2|^2 x 4 + 4 x (1 + 4 - 2 x 2) = 20
    assert frechet_distance(x, 2 * y + 2) == pytest.approx(20.0, rel=0.03)
    same, _ = kernel_inception_distance(x, y, subsets=10, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 1, subsets=10, subset_size=200)
    assert abs(same) < 0.01 and shifted > 0.5
    images = sorted((data_root / "images" / "nih" / "normal").glob("*.jpg"))[:4]
    d = nearest_hash_distances(images[:2], images)
    # each image is in the pool: found as a copy (a few bits apart: the audit hashes JPEGs from a DCT-domain
    # downscaled decode, the query side from the full decode)
    assert (d <= 4).all()
    assert (nearest_hash_distances(images[:2], images[2:]) > 24).all()
