"""Training building blocks: config validation and overrides, samplers on the real manifest, augmentation, mixup."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from covidcxr.errors import ConfigError
from covidcxr.training.augment import BatchMixer, apply_seeded, build_augmentation
from covidcxr.training.config import AugmentConfig, load_config
from covidcxr.training.optim import lr_factor
from covidcxr.training.sampling import make_batch_sampler, source_balanced_cell_weights

REPO = Path(__file__).resolve().parent.parent
IEEE, FIG1 = "s-mostafa-a/covid-chestxray-dataset", "agchung/Figure1-COVID-chestxray-dataset"


# ---------------------------------------------------------------- config

def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, ["model.name=resnet18", "train.epochs=3", "train.lr=1e-3", "augment.scale=[0.8, 1.2]",
                             "train.patience=null", "ensemble.tta=[hflip]"])
    assert cfg.model.name == "resnet18" and cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-3)
    assert tuple(cfg.augment.scale) == (0.8, 1.2) and cfg.train.patience is None and cfg.ensemble.tta == ["hflip"]


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'.*did you mean train\.epochs"):
        load_config(None, ["train.epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: config key train\.lerning_rate: unknown key"):
        load_config(bad)
    # A vertical flip option does not exist: it is not a CXR augmentation.
    with pytest.raises(ConfigError, match=r"augment\.vflip"):
        load_config(None, ["augment.vflip=0.5"])


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"config key train\.lr: .*greater than 0.*-1"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"config key train\.selection_metric"):
        load_config(None, ["train.selection_metric=test_auc"])
    with pytest.raises(ConfigError, match=r"config key preprocess\.image_size"):
        load_config(None, ["preprocess.image_size=8"])
    with pytest.raises(ConfigError, match=r"threshold_target"):
        load_config(None, ["train.threshold_method=sensitivity"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(None, ["train.epochs"])


def test_paths_expand_against_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COVIDCXR_DATA_ROOT", str(tmp_path / "cxr"))
    cfg = load_config(None, [])
    assert cfg.data.manifest == f"{tmp_path}/cxr/manifest.csv"
    monkeypatch.delenv("COVIDCXR_DATA_ROOT")
    from covidcxr import paths

    assert load_config(None, []).data.manifest == f"{paths.data_root()}/manifest.csv"
    with pytest.raises(ConfigError, match=r"model\.weights: environment variable NOT_SET_ANYWHERE"):
        load_config(None, ["model.weights=${NOT_SET_ANYWHERE}/w.pth"])


def test_shipped_configs_validate(monkeypatch):
    from covidcxr.training.synth.config import load_synth_config

    # CycleGAN configs (covidcxr synth train) are another kind of config: validated by their own loader.
    synth = sorted((REPO / "configs").glob("synth_*.yaml"))
    assert synth and all(load_synth_config(p) for p in synth)
    configs = sorted(set((REPO / "configs").glob("*.yaml")) - set(synth))
    names = {p.stem for p in configs}
    assert {"quick", "deepcovid_resnet18", "densenet121_3class", "mobilenetv2_scratch", "efficientnet_mixup_highres",
            "ensemble_10fold"} <= names
    for path in configs:
        cfg = load_config(path)
        assert cfg.data.manifest.endswith("manifest.csv"), path
        if cfg.model.weights not in ("none", "imagenet"):
            assert Path(cfg.model.weights).is_absolute() and cfg.model.weights_sha256, path
    assert load_config(REPO / "configs" / "ensemble_10fold.yaml").ensemble.folds == 10
    assert load_config(REPO / "configs" / "densenet121_3class.yaml").data.label_space == "3class"


def test_warmup_then_cosine_schedule():
    kw = dict(steps_per_epoch=10, epochs=5, schedule="cosine", warmup_epochs=1)
    f = [lr_factor(s, **kw) for s in range(50)]
    assert f[0] < f[5] < f[9] <= 1.0  # linear warm-up over the first epoch
    assert f[10] == pytest.approx(1.0) and f[49] < 0.01 and all(a >= b for a, b in zip(f[10:], f[11:]))
    step = [lr_factor(s, steps_per_epoch=10, epochs=30, schedule="step", warmup_epochs=0, step_epochs=10,
                      step_gamma=0.1) for s in (0, 99, 100, 250)]
    assert step == pytest.approx([1.0, 1.0, 0.1, 0.01])


# ---------------------------------------------------------------- samplers (real manifest)

@pytest.fixture(scope="module")
def train_rows(split_manifest):
    from covidcxr.data.labels import get_label_space

    table = split_manifest.table[split_manifest.table["split"] == "train"]
    labels = get_label_space("binary").assign(table).to_list()
    return labels, table["source"].to_list()


def test_source_balanced_batches_draw_classes_evenly_within_and_across_sources(train_rows):
    labels, sources = train_rows
    weights = source_balanced_cell_weights(labels, sources)
    # 5 sources, equal weight; IEEE and Figure1 hold both classes and split their share evenly.
    assert weights[(IEEE, "covid")] == pytest.approx(0.1) and weights[(IEEE, "non-covid")] == pytest.approx(0.1)
    assert weights[(FIG1, "covid")] == pytest.approx(0.1)
    assert sum(w for (s, _), w in weights.items() if s not in (IEEE, FIG1)) == pytest.approx(0.6)
    sampler = make_batch_sampler("source_balanced", labels, sources, batch_size=20, samples_per_epoch=400, seed=3)
    assert len(sampler) == 20
    total = Counter()
    for batch in sampler:
        cells = Counter((sources[r], labels[r]) for r, _ in batch)
        per_source = Counter(s for s, _ in cells.elements())
        assert len(batch) == 20 and set(per_source.values()) == {4}, per_source  # 4 per source in EVERY batch
        for src in (IEEE, FIG1):
            assert cells[(src, "covid")] == cells[(src, "non-covid")] == 2
        total.update(cells)
    # Figure1 holds 2 non-COVID training images (at most) and is still drawn as often as its COVID ones.
    assert total[(FIG1, "non-covid")] == total[(FIG1, "covid")] == 40


def test_source_balanced_sampling_can_drop_one_class_sources(train_rows):
    labels, sources = train_rows
    sampler = make_batch_sampler("source_balanced", labels, sources, 16, 160, seed=0, single_class_source_weight=0)
    drawn = Counter(sources[r] for batch in sampler for r, _ in batch)
    assert set(drawn) == {IEEE, FIG1} and drawn[IEEE] == drawn[FIG1]


def test_sampler_is_a_function_of_seed_and_epoch(train_rows):
    labels, sources = train_rows
    a = make_batch_sampler("balanced", labels, sources, 16, 64, seed=1)
    b = make_batch_sampler("balanced", labels, sources, 16, 64, seed=1)
    b.set_epoch(1)
    first = list(a)
    assert all(Counter(labels[r] for r, _ in batch) == {"covid": 8, "non-covid": 8} for batch in first)
    assert first != list(b)
    b.set_epoch(0)
    assert first == list(b)
    plain = make_batch_sampler("none", labels, sources, 16, 64, seed=1)
    rows = [r for batch in plain for r, _ in batch]
    assert len(rows) == 64 and len(set(rows)) == 64


# ---------------------------------------------------------------- augmentation and mixing

def test_augmentation_never_flips_vertically():
    cfg = AugmentConfig(hflip_p=1.0, strong_intensity=True, rotation_deg=10)
    aug = build_augmentation(cfg)
    assert not any(isinstance(t, v2.RandomVerticalFlip) for t in aug.transforms)
    img = torch.zeros(1, 64, 64)
    img[:, :20, :] = 1.0  # a bright band at the top ("the shoulders")
    for seed in range(40):
        out = apply_seeded(aug, img, seed)
        assert out.shape == img.shape and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        assert out[:, :24].mean() > out[:, 40:].mean() + 0.2, seed


def test_augmentation_is_reproducible_per_seed_and_leaves_the_global_rng_alone():
    aug = build_augmentation(AugmentConfig(strong_intensity=True))
    img = torch.rand(1, 48, 48)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b, c = apply_seeded(aug, img, 5), apply_seeded(aug, img, 5), apply_seeded(aug, img, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.get_rng_state())


def test_mixup_mixes_images_and_targets_with_one_lambda():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    mixed, soft = BatchMixer(2, mixup_alpha=0.4)(x, y)
    assert torch.allclose(soft.sum(1), torch.ones(6))
    lam = float(soft[0, 0])  # sample 0 (class 0) is mixed with sample 5 (class 1): weight lam on class 0
    assert 0.0 < lam < 1.0
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    assert torch.allclose(soft[:, 1], torch.where(y == 1, torch.tensor(lam), torch.tensor(1 - lam)), atol=1e-6)


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    torch.manual_seed(1)
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    mixed, soft = BatchMixer(2, cutmix_alpha=1.0)(x, y)
    from_self = (mixed == x).float().mean(dim=(1, 2, 3))
    from_other = (mixed == x.roll(1, 0)).float().mean(dim=(1, 2, 3))
    assert torch.allclose(from_self + from_other, torch.ones(4))  # every pixel from one of the two images
    assert torch.allclose(soft[torch.arange(4), y], from_self, atol=1e-6)


def test_no_mixing_gives_one_hot_targets():
    x, y = torch.rand(3, 1, 4, 4), torch.tensor([1, 0, 1])
    out, soft = BatchMixer(2)(x, y)
    assert torch.equal(out, x) and torch.equal(soft, torch.nn.functional.one_hot(y, 2).float())


# ---------------------------------------------------------------- training data selection

def test_unsplit_manifest_needs_a_split_or_split_seed(shared_manifest):
    from covidcxr.training.rows import prepare_training_data

    with pytest.raises(ConfigError, match=r"covidcxr data split.*data\.split_seed"):
        prepare_training_data(load_config(None, []), shared_manifest)
    data = prepare_training_data(load_config(None, ["data.split_seed=0"]), shared_manifest)
    assert data.split_info["split_created_here"] and data.split_info["split_seed"] == 0
    t = data.manifest.table
    train_patients = set(t.loc[data.train_mask, "patient_id"])
    assert not train_patients & set(t.loc[data.val_mask, "patient_id"])  # patient-grouped
    assert not (data.train_mask | data.val_mask)[t["split"].to_numpy() == "test"].any()  # test never used


def test_validation_cap_is_stratified_and_holdout_sources_are_left_out(split_manifest):
    from covidcxr.training.rows import prepare_training_data

    cfg = load_config(None, ["data.val_max_images=100", f"data.holdout_sources=['{FIG1}']"])
    data = prepare_training_data(cfg, split_manifest)
    t = data.manifest.table
    assert 90 <= data.val_mask.sum() <= 115
    assert not t.loc[data.train_mask | data.val_mask, "source"].eq(FIG1).any()
    val = t[data.val_mask]
    assert set(val["label"]) == {"covid", "normal", "pneumonia"} | ({"other"} & set(val["label"]))
    assert val["source"].nunique() == 4


def test_dataset_skips_unreadable_images_with_their_reason(split_manifest, tmp_path, caplog):
    import shutil

    from covidcxr.data.dataset import CXRDataset
    from covidcxr.data.preprocess import PreprocessSpec

    table = split_manifest.table.head(4).copy()
    paths = split_manifest.image_paths()[:4]
    for i, p in enumerate(paths[:3]):
        shutil.copy(p, tmp_path / f"img{i}.jpg")
    (tmp_path / "img1.jpg").write_bytes(b"not an image at all")  # corrupt
    table["image"] = ["img0.jpg", "img1.jpg", "img2.jpg", "missing.jpg"]
    manifest = split_manifest.replace(table)
    manifest.root = tmp_path
    with caplog.at_level("WARNING"):
        ds = CXRDataset(manifest, "binary", PreprocessSpec(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3), validate="decode")
    assert len(ds) == 2 and list(ds.rows) == [0, 2]
    reasons = {Path(s.path).name: s.reason for s in ds.skipped}
    assert set(reasons) == {"img1.jpg", "missing.jpg"} and "not found" in reasons["missing.jpg"]
    assert "img1.jpg" in caplog.text and "missing.jpg" in caplog.text
    x, y, i = ds[(1, 123)]
    assert x.shape == (3, 32, 32) and i == 1 and y == ds.targets[1]
    assert ds.report()["skipped"][0]["row"] in (1, 3)


def test_kfold_development_rows_are_not_cut_by_the_single_run_val_cap(split_manifest):
    """data.val_max_images caps one run's val split; k-fold must still use every train + val row."""
    from covidcxr.training.cv import assign_folds

    cfg = load_config(None, ["data.val_max_images=100"])
    data, dev, _ = assign_folds(cfg, split_manifest, 3)
    manifest = data.manifest
    split = manifest.table["split"].to_numpy()
    assert dev.sum() == (split == "train").sum() + (split == "val").sum()
    assert not dev[split == "test"].any()
    fold = manifest.table["fold"].to_numpy()
    assert set(fold[dev]) == {0, 1, 2} and (fold[~dev] == -1).all()


def test_auc_selection_without_positive_validation_rows_fails_before_training(split_manifest, tmp_path):
    """Validation with no covid image: AUC could never select a checkpoint, so say so up front."""
    from covidcxr.training.loop import fit

    t = split_manifest.table
    keep = (t["split"] == "train") | ((t["split"] == "val") & (t["label"] != "covid"))
    manifest = split_manifest.subset(mask=keep.to_numpy())
    cfg = load_config(None, ["train.selection_metric=auc", "train.epochs=1", "train.progress=false",
                             "model.weights=none", "model.name=resnet18", "preprocess.image_size=64",
                             "data.validate_images=exists"])
    with pytest.raises(ConfigError, match=r"auc needs every class.*hold no covid"):
        fit(cfg, tmp_path / "run", manifest=manifest)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_rows_without_a_split_are_refused_not_silently_skipped(split_manifest, shared_manifest):
    """A new source concatenated to a split manifest leaves its rows unassigned: training must say so."""
    from covidcxr.data.manifest import Manifest
    from covidcxr.training.rows import prepare_training_data

    t = split_manifest.table
    old = split_manifest.subset(mask=(t["source"] != FIG1).to_numpy())
    new = shared_manifest.subset(mask=(shared_manifest.table["source"] == FIG1).to_numpy())
    merged = Manifest.concat([old, new], root=split_manifest.root)
    n_new = int((merged.table["split"] == "").sum())
    assert n_new == len(new) > 0
    with pytest.raises(ConfigError, match=rf"{n_new} of {len(merged)} rows have no 'split' value.*covidcxr data split"):
        prepare_training_data(load_config(None, []), merged)


def test_dropping_one_class_sources_with_none_left_is_a_config_error(train_rows):
    labels, sources = train_rows
    one_class = [i for i, s in enumerate(sources) if s not in (IEEE, FIG1)]  # the three one-class sources
    with pytest.raises(ConfigError, match=r"train\.single_class_source_weight.*no training source holds two classes"):
        make_batch_sampler("source_balanced", [labels[i] for i in one_class], [sources[i] for i in one_class], 16,
                           160, seed=0, single_class_source_weight=0)


def test_training_rows_missing_a_class_fail_before_training(split_manifest, tmp_path):
    """A single-source manifest without COVID images (normal / pneumonia only) under the binary label space."""
    from covidcxr.training.loop import fit

    t = split_manifest.table
    manifest = split_manifest.subset(mask=(t["source"] == "muhammedtalo/COVID-19").to_numpy())
    cfg = load_config(None, ["train.selection_metric=val_loss", "train.epochs=1", "train.progress=false",
                             "model.weights=none", "model.name=resnet18", "preprocess.image_size=64",
                             "data.validate_images=exists"])
    with pytest.raises(ConfigError, match=r"training images hold no covid.*could never learn"):
        fit(cfg, tmp_path / "run", manifest=manifest)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_holdout_source_patients_are_held_out_in_every_source(split_manifest):
    """A pre-split manifest where one Figure1 patient also has an IEEE training image (one person, two
    sources): holding out Figure1 must keep that patient's IEEE image out of training too."""
    from covidcxr.training.rows import prepare_training_data

    table = split_manifest.table.copy()
    fig1_patient = table.loc[table["source"] == FIG1, "patient_id"].iloc[0]
    ieee_train = table.index[(table["source"] == IEEE) & (table["split"] == "train")][0]
    table.loc[ieee_train, "patient_id"] = fig1_patient
    data = prepare_training_data(load_config(None, [f"data.holdout_sources=['{FIG1}']"]), split_manifest.replace(table))
    used = data.train_mask | data.val_mask
    assert not used[ieee_train] and fig1_patient not in set(table.loc[used, "patient_id"])
    assert used.sum() == ((table["split"].isin(["train", "val"])) & (table["source"] != FIG1)).sum() - 1


# ---------------------------------------------------------------- storage augmentation (JPEG / resolution)

def _storage_only(**kw) -> AugmentConfig:
    # geometry and intensity off: what is left is the storage augmentation alone
    return AugmentConfig(rotation_deg=0, scale=(1.0, 1.0), translate=0, brightness=0, contrast=0, **kw)


def _xray_like(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    smooth = 0.5 + 0.3 * torch.cos(3 * xx) * torch.cos(2 * yy)
    return (smooth + 0.08 * torch.rand(size, size, generator=g)).clamp(0, 1)[None]


def test_storage_augmentation_config_is_validated():
    cfg = load_config(None, ["augment.jpeg_p=0.5", "augment.jpeg_quality=[30, 95]", "augment.jpeg_scale=[1, 3]",
                             "augment.resolution_p=0.3", "augment.resolution_scale=[0.4, 1.0]"])
    assert cfg.augment.jpeg_quality == (30, 95) and cfg.augment.jpeg_scale == (1.0, 3.0)
    for bad, key in (("augment.jpeg_quality=[0, 95]", "jpeg_quality"), ("augment.jpeg_quality=[95, 30]", "jpeg_quality"),
                     ("augment.jpeg_quality=[30.5, 90]", "jpeg_quality"), ("augment.jpeg_quality=[true, 90]", "jpeg_quality"),
                     ("augment.jpeg_p=1.5", "jpeg_p"), ("augment.jpeg_p=true", "jpeg_p"),
                     ("augment.jpeg_scale=[0.5, 2]", "jpeg_scale"), ("augment.resolution_scale=[0.5, 1.5]", "resolution_scale"),
                     ("augment.resolution_p=.nan", "resolution_p")):
        with pytest.raises(ConfigError, match=rf"augment(\.|: .*){key}"):
            load_config(None, [bad])


def test_jpeg_augmentation_recompresses_at_a_seeded_random_quality():
    from covidcxr.training.augment import RandomJPEG, jpeg_roundtrip

    img = _xray_like()
    aug = build_augmentation(_storage_only(jpeg_p=1.0, jpeg_quality=(30, 95)))
    assert any(isinstance(t, RandomJPEG) for t in aug.transforms)
    candidates = {q: jpeg_roundtrip(img, q) for q in range(30, 96)}
    seen = set()
    for seed in range(12):
        out = apply_seeded(aug, img, seed)
        assert out.shape == img.shape and not torch.equal(out, img)
        match = [q for q, c in candidates.items() if torch.equal(out, c)]
        assert match, seed  # exactly a JPEG round trip at a quality inside the range
        seen.add(match[0])
        assert torch.equal(out, apply_seeded(aug, img, seed))
    assert len(seen) > 3  # the quality is drawn per seed
    # lower quality, larger error; p = 0 leaves the image alone
    err = {q: float((jpeg_roundtrip(img, q) - img).abs().mean()) for q in (95, 70, 30)}
    assert err[95] < err[70] < err[30]
    assert torch.equal(apply_seeded(build_augmentation(_storage_only(jpeg_p=0.0)), img, 0), img)


def test_jpeg_scale_compresses_an_enlarged_copy():
    from covidcxr.training.augment import jpeg_roundtrip

    img = _xray_like()
    plain, enlarged = jpeg_roundtrip(img, 40), jpeg_roundtrip(img, 40, scale=3.0)
    assert enlarged.shape == img.shape and not torch.equal(plain, enlarged)
    # compressing a 3x larger original leaves smaller artefacts at this resolution
    assert float((enlarged - img).abs().mean()) < float((plain - img).abs().mean())


def test_resolution_augmentation_removes_fine_detail():
    from covidcxr.training.augment import RandomResolution

    img = _xray_like()
    aug = build_augmentation(_storage_only(resolution_p=1.0, resolution_scale=(0.25, 0.3)))
    assert any(isinstance(t, RandomResolution) for t in aug.transforms)
    out = apply_seeded(aug, img, 1)
    assert out.shape == img.shape

    def detail(x):  # energy of the pixel-to-pixel differences
        return float((x[..., 1:] - x[..., :-1]).pow(2).mean())

    assert detail(out) < 0.3 * detail(img)
    assert torch.equal(out, apply_seeded(aug, img, 1))


def test_dataset_applies_the_storage_augmentation_to_its_items(split_manifest):
    import functools

    from covidcxr.data.dataset import CXRDataset
    from covidcxr.data.preprocess import PreprocessSpec

    manifest = split_manifest.subset(mask=(split_manifest.table.index < 2))
    spec = PreprocessSpec(image_size=64, intensity="none", mean=(0.5,) * 3, std=(0.5,) * 3)
    aug = build_augmentation(_storage_only(jpeg_p=1.0, jpeg_quality=(20, 20)))
    ds = CXRDataset(manifest, "binary", spec, augment=functools.partial(apply_seeded, aug))
    clean, seeded = ds[0][0], ds[(0, 5)][0]
    assert not torch.equal(clean, seeded) and torch.equal(seeded, ds[(0, 5)][0])
    assert float((clean - seeded).abs().mean()) < 0.1  # a recompressed copy, not another image


def test_objective_and_lpft_config_combinations():
    cfg = load_config(None, ["train.objective=group_dro", "train.lp_epochs=1", "train.epochs=3", "train.lp_lr=0.003"])
    assert cfg.train.objective == "group_dro" and cfg.train.lp_epochs == 1 and cfg.train.lp_lr == pytest.approx(0.003)
    with pytest.raises(ConfigError, match=r"train\.objective"):
        load_config(None, ["train.objective=auc"])
    with pytest.raises(ConfigError, match=r"train\.lp_epochs \(3\) must be smaller than train\.epochs \(3\)"):
        load_config(None, ["train.lp_epochs=3", "train.epochs=3"])
    with pytest.raises(ConfigError, match=r"train\.lp_epochs needs model\.finetune full or last_k"):
        load_config(None, ["train.lp_epochs=1", "model.finetune=linear"])
    with pytest.raises(ConfigError, match=r"train\.objective=within_source_auc .*mixup_alpha"):
        load_config(None, ["train.objective=within_source_auc", "augment.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match=r"train\.dro_eta"):
        load_config(None, ["train.dro_eta=0"])
    with pytest.raises(ConfigError, match=r"train: .*lp_epochs: True is a boolean"):
        load_config(None, ["train.lp_epochs=true"])


def test_working_stage_jpeg_equals_inference_on_a_resaved_file(split_manifest):
    """augment.storage_stage=working: the training image IS what inference makes of the re-saved JPEG."""
    import cv2

    from covidcxr.data.io import read_xray
    from covidcxr.data.preprocess import PreprocessSpec
    from covidcxr.models.predict import prepare_bytes
    from covidcxr.training.storage import WorkingStageDataset, storage_draw

    manifest = split_manifest.subset(mask=(split_manifest.table.index < 2))
    spec = PreprocessSpec(image_size=64, intensity="clahe", mean=(0.5,) * 3, std=(0.5,) * 3)
    cfg = _storage_only(jpeg_p=1.0, jpeg_quality=(50, 50), storage_stage="working")
    assert not any(type(t).__name__ == "RandomJPEG" for t in build_augmentation(cfg).transforms)
    ds = WorkingStageDataset(manifest, "binary", spec, augment=None, storage=cfg)
    assert storage_draw(cfg, 3) == {"jpeg": 50, "jpeg_scale": 1.0, "resolution": None}
    got = ds[(0, 3)][0]
    u8 = (read_xray(ds.paths[0]).pixels * 255).round().astype("uint8")
    assert max(u8.shape) <= spec.working_size
    ok, buf = cv2.imencode(".jpg", u8, [int(cv2.IMWRITE_JPEG_QUALITY), 50])
    expected = prepare_bytes(buf.tobytes(), "resaved.jpg", spec).tensor
    assert torch.equal(got, expected)
    assert not torch.equal(got, ds[0][0])  # and differs from the stored file's input
    # no storage change drawn (p = 0): the cached prepared image, as CXRDataset gives it
    plain = WorkingStageDataset(manifest, "binary", spec, augment=None, storage=_storage_only(storage_stage="working"))
    assert torch.equal(plain[(0, 3)][0], plain[0][0])


def test_working_stage_jpeg_finds_the_lungs_again_as_inference_does_on_a_resaved_file(split_manifest):
    """With roi: lungs the re-saved image's lungs are segmented again: the mask moves under JPEG, and
    inference on a re-saved file sees the moved mask, so training must too (bench/roi_jpeg_sensitivity.py)."""
    import cv2

    from covidcxr.data.io import decode_xray, read_xray
    from covidcxr.data.preprocess import PreprocessSpec, working_image
    from covidcxr.models.lung_finder import DEFAULT_SEGMENTER, load_lung_finder
    from covidcxr.models.predict import prepare_bytes
    from covidcxr.training.storage import WorkingStageDataset

    manifest = split_manifest.subset(mask=(split_manifest.table.index < 3))
    finder = load_lung_finder(DEFAULT_SEGMENTER, cache=False)
    spec = PreprocessSpec(image_size=96, intensity="none", mean=(0.5,) * 3, std=(0.5,) * 3, roi="lungs",
                          roi_mask_outside=True)
    cfg = _storage_only(jpeg_p=1.0, jpeg_quality=(30, 30), storage_stage="working")
    ds = WorkingStageDataset(manifest, "binary", spec, augment=None, storage=cfg, lung_finder=finder)
    moved = 0
    for i in range(len(ds)):
        u8 = (read_xray(ds.paths[i]).pixels * 255).round().astype("uint8")
        ok, buf = cv2.imencode(".jpg", u8, [int(cv2.IMWRITE_JPEG_QUALITY), 30])
        expected = prepare_bytes(buf.tobytes(), "resaved.jpg", spec, lung_finder=finder)
        assert torch.equal(ds[(i, 3)][0], expected.tensor)
        working = working_image(decode_xray(buf.tobytes(), "resaved.jpg").pixels, spec.working_size)
        moved += int(not np.array_equal(ds.roi(i).keep, ds.storage_roi(i, working).keep))
    assert moved > 0  # at quality 30 the segmenter's mask differs from the clean image's on some image

