"""Source-adversarial training (DANN): gradient reversal, schedule, config, and a real tiny run incl. resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from covidcxr.errors import ConfigError
from covidcxr.training import load_config
from covidcxr.training.adversarial import SourceAdversary, adversary_lambda, grad_reverse, source_index


# ---------------------------------------------------------------- unit

@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grad_reverse_is_identity_forward_and_reverses_scaled_gradients_exactly(lam):
    torch.manual_seed(0)
    x = torch.randn(5, 7, requires_grad=True)
    g = torch.randn(5, 7)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    (y * g).sum().backward()
    assert torch.equal(x.grad, -lam * g)


def test_grad_reverse_flips_only_what_is_behind_it():
    w = torch.tensor([2.0], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    feat = w * 1.5
    (feat * 4.0 + (grad_reverse(feat, 0.5) * v)).sum().backward()
    # d/dw of feat*4 is 6; through the GRL: -0.5 * v * 1.5 = -2.25
    assert float(w.grad) == pytest.approx(6.0 - 2.25) and float(v.grad) == pytest.approx(3.0)


def test_lambda_schedules():
    assert adversary_lambda(0.3, "constant", 0.0) == 0.3 == adversary_lambda(0.3, "constant", 1.0)
    assert adversary_lambda(0.3, "dann", 0.0) == 0.0
    assert adversary_lambda(0.3, "dann", 0.5) == pytest.approx(0.3 * (2 / (1 + math.exp(-5)) - 1))
    assert adversary_lambda(0.3, "dann", 1.0) == pytest.approx(0.3 * (2 / (1 + math.exp(-10)) - 1))
    values = [adversary_lambda(1.0, "dann", p / 10) for p in range(11)]
    assert values == sorted(values) and values[-1] < 1.0


def test_source_index():
    idx, names = source_index(["b", "a", "b", "c"])
    assert names == ["a", "b", "c"] and idx.tolist() == [1, 0, 1, 2]


@pytest.mark.parametrize("override, match", [
    ("train.source_adversarial_weight=-0.1", "source_adversarial_weight"),
    ("train.source_adversarial_weight=.nan", "source_adversarial_weight"),
    ("train.source_adversarial_weight=.inf", "source_adversarial_weight"),
    ("train.source_adversarial_weight=true", "source_adversarial_weight"),
    ("train.source_adversarial_schedule=linear", "source_adversarial_schedule"),
    ("train.source_adversarial_hidden=-1", "source_adversarial_hidden"),
])
def test_bad_adversary_configs_are_one_clear_error(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, [override])
    assert str(err.value).count("config key") == 1


def test_adversary_refuses_mixup_and_accepts_the_other_objectives():
    with pytest.raises(ConfigError, match="source_adversarial_weight > 0 needs one source per image"):
        load_config(None, ["train.source_adversarial_weight=0.3", "augment.mixup_alpha=0.4"])
    for objective in ("ce", "group_dro", "within_source_auc"):
        cfg = load_config(None, ["train.source_adversarial_weight=0.3", f"train.objective={objective}"])
        assert cfg.train.source_adversarial_schedule == "dann" and cfg.train.source_adversarial_hidden == 0


@pytest.mark.parametrize("name, hidden", [("resnet18", 0), ("tf_efficientnet_lite0", 16)])
def test_adversary_reads_the_classifier_input_of_torchvision_and_timm_models(name, hidden):
    from covidcxr.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(name, 2)
    items, names = source_index(["a", "b", "c", "a"])
    adv = SourceAdversary(model, name, 3, items, names, weight=0.5, schedule="constant", hidden=hidden,
                          total_steps=10, lr=1e-3, weight_decay=0.0)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        plain = model.eval()(x)  # no-grad passes (validation, inference) are never captured
    assert adv.features is None
    model.train()
    logits = model(x)
    loss = adv.loss(torch.arange(4))
    assert loss.ndim == 0 and adv.seen == 4 and adv.lam == 0.5
    loss.backward()
    assert all(p.grad is not None for p in adv.net.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0
    adv.remove()
    model(x)
    assert adv.features is None and logits.shape == plain.shape == (4, 2)
    with pytest.raises(ConfigError, match="at least 2 sources"):
        SourceAdversary(model, name, 1, items[:1], ["a"], weight=0.5, schedule="constant", hidden=0, total_steps=1,
                        lr=1e-3, weight_decay=0.0)


# ---------------------------------------------------------------- a real tiny run, killed and resumed

def _tiny(split_manifest, per_cell=3):
    t = split_manifest.table
    keep = np.zeros(len(t), dtype=bool)
    for (_, _, split), idx in t.groupby(["label", "source", "split"]).indices.items():
        if split in ("train", "val"):
            keep[idx[: per_cell if split == "train" else 2]] = True
    return split_manifest.subset(mask=keep)


TINY = ["model.name=tf_efficientnet_lite0", "model.weights=none", "preprocess.image_size=48",
        "preprocess.intensity=percentile", "train.epochs=3", "train.batch_size=8", "train.samples_per_epoch=16",
        "train.lr=0.002", "train.threads=1", "train.progress=false", "train.selection_metric=auc", "train.patience=null",
        "data.validate_images=decode", "train.source_adversarial_weight=0.5", "train.source_adversarial_schedule=dann",
        "train.source_adversarial_hidden=8"]


class _Killed(RuntimeError):
    pass


@pytest.mark.slow
def test_adversarial_run_records_metrics_keeps_the_adversary_out_of_the_model_and_resumes_bit_identically(
        split_manifest, tmp_path, monkeypatch):
    from covidcxr.data.io import read_xray
    from covidcxr.models.run import load_run
    from covidcxr.models.weights import sha256_file
    from covidcxr.training import loop

    manifest = _tiny(split_manifest)
    cfg = load_config(None, TINY)
    ref = loop.fit(cfg, tmp_path / "ref", manifest=manifest)

    real = loop.save_checkpoint

    def save_then_die(path, state):
        real(path, state)
        if state["epoch"] == 1:
            raise _Killed("killed after epoch 1")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        loop.fit(cfg, tmp_path / "killed", manifest=manifest)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["adversary"]["step"] == 2 and "optimizer" in ckpt["adversary"]
    out = loop.fit(cfg, tmp_path / "killed", manifest=manifest, resume=True)

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    keys = ("train_loss", "val_loss", "val_auc", "lr", "adv_source_acc", "adv_loss", "adv_lambda", "adv_majority_acc")
    assert [{k: m.get(k) for k in keys} for m in metrics(out)] == [{k: m.get(k) for k in keys} for m in metrics(ref)]
    assert sha256_file(out / "model.safetensors") == sha256_file(ref / "model.safetensors")
    ms = metrics(ref)
    # 2 steps per epoch, 6 in all: lambda at the last step of each epoch follows the DANN ramp
    assert [m["adv_lambda"] for m in ms] == pytest.approx([adversary_lambda(0.5, "dann", s / 6) for s in (1, 3, 5)])
    assert all(0.0 <= m["adv_source_acc"] <= 1.0 and m["adv_loss"] > 0 and 0 < m["adv_majority_acc"] <= 1 for m in ms)

    info = json.loads((ref / "run.json").read_text())["info"]
    adv = info["source_adversary"]
    assert adv["weight"] == 0.5 and adv["schedule"] == "dann" and adv["hidden"] == 8 and len(adv["sources"]) >= 2
    assert info["objective"]["name"] == "ce"
    # the adversary is training-only: the saved model is the plain architecture
    keys_saved = set(load_file(str(ref / "model.safetensors")))
    from covidcxr.models.registry import create_model
    assert keys_saved == set(create_model("tf_efficientnet_lite0", 2).state_dict())
    run = load_run(ref)
    assert not run.model.classifier._forward_pre_hooks
    rows = manifest.table[manifest.table["split"] == "val"].head(3)
    probs = run.predict_arrays([read_xray(manifest.root / p).pixels for p in rows["image"]])
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
