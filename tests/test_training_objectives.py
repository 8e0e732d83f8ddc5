"""Training objectives (cross-entropy, group DRO, within-source pairwise AUC) and LP-FT, incl. resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from covidcxr.errors import ConfigError
from covidcxr.training import load_config
from covidcxr.training.objectives import (CrossEntropy, GroupDRO, WithinSourcePairwise, abnormal_kinds,
                                          build_objective, cell_ids, source_ids)


# ---------------------------------------------------------------- objectives (unit)

def test_cell_ids_number_source_class_cells():
    groups, cells = cell_ids(["b", "a", "b", "a"], [1, 0, 0, 0])
    assert cells == [("a", 0), ("b", 0), ("b", 1)] and groups.tolist() == [2, 0, 1, 0]
    assert source_ids(cells).tolist() == [0, 1, 1]


def test_ce_objective_is_plain_cross_entropy():
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    soft = F.one_hot(y, 2).float()
    w = torch.tensor([1.0, 3.0])
    got = CrossEntropy(w, 0.1)(logits, soft, y, torch.zeros(6, dtype=torch.long))
    assert torch.equal(got, F.cross_entropy(logits, soft, weight=w, label_smoothing=0.1))


def test_within_source_pairwise_loss_uses_same_source_pairs_only():
    # cells: (A, neg) 0, (A, pos) 1, (B, pos) 2, (C, neg) 3 -> sources A, A, B, C
    group_source = torch.tensor([0, 0, 1, 2])
    obj = WithinSourcePairwise(positive=1, group_source=group_source, ce_weight=0.0)
    # items: A pos, A neg, B pos (scored low), C neg (scored high): the cross-source pair is misordered
    logits = torch.tensor([[0.0, 2.0], [0.0, -1.0], [0.0, -3.0], [0.0, 4.0]], requires_grad=True)
    y = torch.tensor([1, 0, 1, 0])
    groups = torch.tensor([1, 0, 2, 3])
    loss = obj(logits, F.one_hot(y, 2).float(), y, groups)
    assert obj.last_pairs == 1
    assert float(loss.detach()) == pytest.approx(float(F.softplus(torch.tensor(-(2.0 - -1.0)))))
    loss.backward()
    assert torch.all(logits.grad[2:] == 0)  # B and C form no same-source pair: no gradient at all
    assert logits.grad[0, 1] < 0 < logits.grad[1, 1]  # push A's positive up and A's negative down
    # no same-source pair in the batch: only the cross-entropy term remains (zero here)
    none = obj(logits[2:], F.one_hot(y[2:], 2).float(), y[2:], groups[2:])
    assert obj.last_pairs == 0 and float(none.detach()) == 0.0
    # with ce_weight the cross-entropy is added
    with_ce = WithinSourcePairwise(1, group_source, ce_weight=0.5)(logits, F.one_hot(y, 2).float(), y, groups)
    ce = F.cross_entropy(logits, F.one_hot(y, 2).float())
    assert float(with_ce.detach()) == pytest.approx(float(loss.detach()) + 0.5 * float(ce.detach()), rel=1e-6)


def test_group_dro_moves_weight_to_the_worst_group_and_keeps_it_in_its_state():
    obj = GroupDRO(n_groups=3, eta=0.5)
    # group 0 fitted well, group 2 badly, group 1 absent from the batch
    logits = torch.tensor([[5.0, -5.0], [5.0, -5.0], [3.0, -3.0], [2.0, -2.0]])
    y = torch.tensor([0, 0, 1, 1])
    groups = torch.tensor([0, 0, 2, 2])
    soft = F.one_hot(y, 2).float()
    losses, present = obj.group_losses(logits, soft, groups)
    assert present.tolist() == [True, False, True] and float(losses[1]) == 0.0
    loss = obj(logits, soft, y, groups)
    q = obj.q
    # the badly fitted group gains, the absent one keeps its (relative) weight
    assert q[2] > 1 / 3 > q[1] and q[0] >= q[1] and float(q.sum()) == pytest.approx(1.0)
    assert float(loss) == pytest.approx(float((q * losses).sum()))
    state = obj.state_dict()
    fresh = GroupDRO(3, 0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.q, q)
    with pytest.raises(ConfigError, match="groups"):
        GroupDRO(2, 0.5).load_state_dict(state)
    # a NaN loss (training stops on it) must not poison the weights first
    obj(torch.full((4, 2), float("nan")), soft, y, groups)
    assert torch.equal(obj.q, q)


def test_within_source_objective_needs_a_source_with_both_classes():
    cfg = load_config(None, ["train.objective=within_source_auc"])
    with pytest.raises(ConfigError, match="train.objective: within_source_auc needs training sources"):
        build_objective(cfg, class_weights=None, sources=["a", "a", "b"], targets=[0, 0, 1], classes=["non-covid", "covid"],
                        positive="covid")
    obj, groups = build_objective(cfg, class_weights=None, sources=["a", "a", "b"], targets=[0, 1, 0],
                                  classes=["non-covid", "covid"], positive="covid")
    assert isinstance(obj, WithinSourcePairwise) and obj.positive == 1 and len(groups) == 3


def test_abnormal_pairs_rank_disease_above_normal_lungs_inside_a_source_only():
    """train.auc_abnormal_weight: (pneumonia, normal) pairs of one source; never across sources, never COVID."""
    cfg = load_config(None, ["train.objective=within_source_auc", "train.auc_abnormal_weight=2.0",
                             "train.auc_ce_weight=0"])
    sources = ["nih", "nih", "kermany", "ieee", "ieee", "ieee"]
    labels = ["pneumonia", "normal", "normal", "covid", "normal", "pneumonia"]
    targets = [0, 0, 0, 1, 0, 0]
    obj, groups = build_objective(cfg, class_weights=None, sources=sources, targets=targets,
                                  classes=["non-covid", "covid"], positive="covid", labels=labels)
    assert abnormal_kinds(labels).tolist() == [1, 0, 0, 1, 0, 1] and obj.abnormal_weight == 2.0
    # NIH's pneumonia is scored BELOW its normal (misordered); Kermany's normal (another source) far above
    # both; ieee's pneumonia above its normal; COVID above both of ieee's others
    s = torch.tensor([-1.0, 1.0, 5.0, 3.0, -2.0, 0.5])
    logits = torch.stack([torch.zeros(6), s], 1).requires_grad_(True)
    y = torch.tensor(targets)
    loss = obj(logits, F.one_hot(y, 2).float(), y, torch.as_tensor(groups))
    assert obj.last_pairs == 2 and obj.last_abnormal_pairs == 2  # (nih pn, nih nl), (ieee pn, ieee nl)
    covid_term = (F.softplus(torch.tensor(-(3.0 + 2.0))) + F.softplus(torch.tensor(-(3.0 - 0.5)))) / 2
    abnormal_term = (F.softplus(torch.tensor(-(-1.0 - 1.0))) + F.softplus(torch.tensor(-(0.5 + 2.0)))) / 2
    assert float(loss.detach()) == pytest.approx(float(covid_term + 2.0 * abnormal_term), rel=1e-6)
    loss.backward()
    assert logits.grad[2].abs().sum() == 0  # Kermany's lone normal pairs with nothing
    assert logits.grad[0, 1] < 0 < logits.grad[1, 1]  # raise NIH's pneumonia, lower its normal
    # off by default: the same batch gives the COVID pairs only
    plain, _ = build_objective(load_config(None, ["train.objective=within_source_auc", "train.auc_ce_weight=0"]),
                               class_weights=None, sources=sources, targets=targets, classes=["non-covid", "covid"],
                               positive="covid", labels=labels)
    plain_groups, _ = cell_ids(sources, targets)
    got = plain(logits.detach(), F.one_hot(y, 2).float(), y, torch.as_tensor(plain_groups))
    assert float(got) == pytest.approx(float(covid_term), rel=1e-6) and plain.abnormal_weight == 0.0


def test_abnormal_pairs_need_a_source_with_both_and_the_pairwise_objective():
    cfg = load_config(None, ["train.objective=within_source_auc", "train.auc_abnormal_weight=1"])
    with pytest.raises(ConfigError, match="no training source holds both normal and abnormal"):
        build_objective(cfg, class_weights=None, sources=["a", "a", "b"], targets=[1, 0, 0],
                        classes=["non-covid", "covid"], positive="covid", labels=["covid", "normal", "pneumonia"])
    with pytest.raises(ConfigError, match="manifest label"):
        build_objective(cfg, class_weights=None, sources=["a", "a"], targets=[1, 0], classes=["non-covid", "covid"],
                        positive="covid")
    with pytest.raises(ConfigError, match="auc_abnormal_weight is a term of objective within_source_auc, not ce"):
        load_config(None, ["train.objective=ce", "train.auc_abnormal_weight=1"])


# ---------------------------------------------------------------- LP-FT (unit)

def test_lpft_probe_freezes_the_backbone_then_fine_tunes_with_a_restarted_schedule():
    from covidcxr.models.finetune import apply_lpft_phase
    from covidcxr.training.optim import build_model, build_optimizer, build_scheduler

    cfg = load_config(None, ["model.name=tf_efficientnet_lite0", "model.weights=none", "train.epochs=3",
                             "train.lp_epochs=1", "train.lr=0.01", "train.lp_lr=0.05", "model.backbone_lr_mult=0.1",
                             "train.warmup_epochs=0", "train.schedule=cosine"])
    torch.manual_seed(0)
    model, groups, _ = build_model(cfg, 2)
    optimizer = build_optimizer(cfg, groups)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=3)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["head"]["lr"] == pytest.approx(0.05) and by_name["backbone"]["lr"] == 0.0

    def snapshot():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def steps(n):
        model.train()
        for _ in range(n):
            loss = F.cross_entropy(model(torch.rand(4, 3, 48, 48)), torch.tensor([0, 1, 0, 1]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

    plan = apply_lpft_phase(model, "tf_efficientnet_lite0", 0, 1, "full")
    assert plan.mode == "linear"
    before = snapshot()
    steps(3)
    after = snapshot()
    head = [k for k in before if k.startswith("classifier.")]
    assert head and all(not torch.equal(before[k], after[k]) for k in head if k.endswith("weight"))
    # backbone weights AND BatchNorm running statistics untouched by the probe
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("classifier."))
    # fine-tuning phase: schedule restarts at the full base lr, backbone at lr x backbone_lr_mult
    assert by_name["head"]["lr"] == pytest.approx(0.01) and by_name["backbone"]["lr"] == pytest.approx(0.001)
    plan = apply_lpft_phase(model, "tf_efficientnet_lite0", 1, 1, "full")
    assert plan.mode == "full" and not plan.frozen
    steps(1)
    tuned = snapshot()
    assert any(not torch.equal(after[k], tuned[k]) for k in after if k.startswith("conv_stem"))
    assert any(not torch.equal(after[k], tuned[k]) for k in after if k.endswith("running_mean"))


# ---------------------------------------------------------------- in the training loop: resume stays bit-identical



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
        "data.validate_images=decode", "augment.jpeg_p=0.5", "augment.resolution_p=0.5", "augment.jpeg_scale=[1, 2]"]


class _Killed(RuntimeError):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["train.objective=group_dro", "train.sampler=source_balanced", "train.lp_epochs=1", "train.lp_lr=0.01",
     "model.backbone_lr_mult=0.2"],
    ["train.objective=within_source_auc", "train.sampler=source_balanced", "train.lp_epochs=2",
     "augment.storage_stage=working", "train.auc_abnormal_weight=1.0"],
], ids=["lpft+group_dro", "lpft+within_source_auc"])
def test_lpft_and_objectives_resume_bit_identically(split_manifest, tmp_path, monkeypatch, extra):
    """Stopped right after epoch 1's checkpoint (inside or at the end of the probe) and resumed:
    the same metrics and weights as an uninterrupted run."""
    from covidcxr.models.weights import sha256_file
    from covidcxr.training import loop

    manifest = _tiny(split_manifest)
    cfg = load_config(None, TINY + extra)
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
    assert not (tmp_path / "killed" / "run.json").exists()
    out = loop.fit(cfg, tmp_path / "killed", manifest=manifest, resume=True)

    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    keys = ("train_loss", "val_loss", "val_auc", "lr", "phase", "dro_group_weights")
    assert [{k: m.get(k) for k in keys} for m in metrics(out)] == [{k: m.get(k) for k in keys} for m in metrics(ref)]
    assert sha256_file(out / "model.safetensors") == sha256_file(ref / "model.safetensors")
    lp = cfg.train.lp_epochs
    assert [m["phase"] for m in metrics(ref)] == ["linear_probe"] * lp + ["finetune"] * (3 - lp)
    info = json.loads((ref / "run.json").read_text())["info"]
    assert info["lp_ft"]["lp_epochs"] == lp and info["objective"]["name"] == cfg.train.objective
    if cfg.train.objective == "within_source_auc":
        assert info["objective"]["abnormal_weight"] == cfg.train.auc_abnormal_weight == 1.0
    if cfg.train.objective == "group_dro":
        q = np.asarray(info["objective"]["group_weights"])
        # the weights moved (so resuming without them would have changed the result)
        assert q.max() > 1.5 / len(q) and q.sum() == pytest.approx(1.0)
        assert len(info["objective"]["groups"]) == len(q)
