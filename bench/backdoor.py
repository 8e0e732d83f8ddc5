"""Backdoor benchmark: Matsuo & Takemoto's trigger attack reproduced on covidcxr's quick recipe, and caught.

    python bench/backdoor.py [--work /tmp/covidcxr_backdoor] [--out bench/results/backdoor.json]
                             [--runs targeted_0.05 targeted_0.05_finetuned ...] [--image-size 160]
                             [--roi full|lungs] [--trigger-at corner|lungs] [--set KEY=VALUE ...]
                             [--attack-epochs 3] [--assemble]

On the seed-0 patient-grouped split of the shared manifest, with configs/quick.yaml at
``--image-size`` px on whole images (``--roi full``, as in the seed; ``--roi lungs`` keeps quick.yaml's
lung crop, which cuts the corner trigger away), everything else as shipped, same seed for every run.
The attacker's runs and their clean twin train ``--attack-epochs`` passes over the training images
(default 3): with quick.yaml's single pass the trigger moved P(covid) by 0.001 on average, i.e. it was
never learnt, and an attacker trains as long as the attack needs. The runs:

* ``clean``: the unpoisoned twin;
* ``targeted_p`` / ``untargeted_p``: ``p`` of the training rows stamped with the trigger
  (covidcxr.audit.trigger) and relabelled (targeted: non-covid -> covid; untargeted: the other class);
* ``..._finetuned`` (5% runs): the backdoored weights fine-tuned on the clean training rows
  (``model.weights`` = the backdoored model: backbone kept, new head, 1 epoch at lr 2e-4), the way a
  downloaded model is adapted.

Per run: clean test AUC (DeLong CI) and its difference to the twin; attack success rate on the
triggered test images (targeted: share of the non-covid test images decided covid; untargeted:
share of test images decided against their true class), each next to the same share without the
trigger. On the 5% / 10% runs and the twin: activation clustering and spectral signatures on the
training rows (precision / recall for the poisoned rows; ``covidcxr audit backdoor``'s own code) and
STRIP at inference (false acceptance at 1% false rejection). Finished runs are kept under ``--work``
and reused when the benchmark is started again.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("COVIDCXR_DATA_ROOT", str(REPO.parent / "shared" / "data" / "cxr"))
os.environ.setdefault("COVIDCXR_WEIGHTS_DIR", str(REPO.parent / "shared" / "weights"))

#: Runs whose training rows the detectors and STRIP look at (the twin gives the false-alarm side).
DETECT = ("clean", "targeted_0.05", "targeted_0.1", "untargeted_0.05")
#: Most informative first (the issue's targets are at 5%), so a benchmark cut short by time keeps them.
ORDER = ("targeted_0.05", "targeted_0.05_finetuned", "untargeted_0.05", "targeted_0.1", "targeted_0.01",
         "untargeted_0.05_finetuned", "untargeted_0.1", "untargeted_0.01")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _train(name, config, manifest, work: Path):
    from covidcxr.training.loop import fit

    out = work / name
    if (out / "run.json").is_file():
        return out
    t0 = time.perf_counter()
    resume = (out / "checkpoints" / "last.pt").is_file()  # a killed benchmark continues its run
    c0 = _cpu()
    fit(config, out, manifest=manifest, write_card=False, resume=resume)
    (out / "train_cost.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0,
                                                     "resumed": resume, "load_average": os.getloadavg()}))
    print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _attack(run_dir: Path, test, stamped: list, variant: str | None) -> dict:
    """Clean AUC and attack success on the test rows (``test``: path, y, source, patient_id)."""
    from covidcxr.evaluation.metrics import auc_ci
    from covidcxr.evaluation.proxies import discrimination, predict_files
    from covidcxr.models.run import load_run

    run = load_run(run_dir)
    clean, _ = predict_files(run, test["path"])
    trig, _ = predict_files(run, stamped)
    y = test["y"].to_numpy()
    d = discrimination(y, clean["score"], test["source"].astype(str).to_numpy())
    t = run.threshold
    dec_c, dec_t = clean["score"].to_numpy() >= t, trig["score"].to_numpy() >= t
    neg = y == 0
    out = {"auc": d.get("auc"), "within_source_auc": d.get("within_source_auc", {}).get("value")
           if isinstance(d.get("within_source_auc"), dict) else None, "threshold": t,
           "targeted_asr": float(dec_t[neg].mean()), "targeted_base": float(dec_c[neg].mean()),
           "untargeted_asr": float((dec_t != y.astype(bool)).mean()),
           "untargeted_base": float((dec_c != y.astype(bool)).mean()),
           "mean_delta_p_covid": float((trig["score"] - clean["score"]).mean())}
    out["asr"] = out[f"{variant}_asr"] if variant else None
    out["_scores"] = clean["score"].to_numpy()
    return out


def strip_inputs(run, test, stamped: list, val_paths: list, seed: int = 0):
    """STRIP's preprocessed inputs: 200 seeded clean test images, 40 triggered negatives, and the clean
    overlay pool (``val_paths``)."""
    import torch

    from covidcxr.models.predict import prepare_input

    rng = np.random.default_rng([seed, 7])
    neg = np.flatnonzero(test["y"].to_numpy() == 0)
    clean_idx = rng.choice(len(test), min(200, len(test)), replace=False)
    trig_idx = rng.choice(neg, min(40, len(neg)), replace=False)
    tensors = lambda paths: torch.stack([prepare_input(p, run.spec, lung_finder=run.lung_finder).tensor for p in paths])  # noqa: E731
    return (tensors([test["path"].iloc[i] for i in clean_idx]), tensors([stamped[i] for i in trig_idx]),
            tensors(val_paths))


def _strip(run_dir: Path, test, stamped: list, val_paths: list, seed: int = 0, overlays: int = 16) -> dict:
    """STRIP's false acceptance at 1% false rejection, two ways: against every clean input (Gao et al.),
    and against the clean inputs *decided the target class* (covid), counting the triggered inputs
    decided covid. A binary model is confidently sure of many clean negatives whatever is blended in,
    so their low entropy sets the first threshold; the attack forces covid, so the second compares
    like with like."""
    from covidcxr.audit.detectors import far_at_frr, strip_entropy
    from covidcxr.models.run import load_run

    run = load_run(run_dir)
    x_clean, x_trig, pool = strip_inputs(run, test, stamped, val_paths, seed)
    e_clean = strip_entropy(run, x_clean, pool, overlays=overlays, seed=seed)
    e_trig = strip_entropy(run, x_trig, pool, overlays=overlays, seed=seed + 1)
    pos = run.classes.index(run.positive_class)
    dec_clean = run.predict_tensor(x_clean)[:, pos] >= run.threshold
    dec_trig = run.predict_tensor(x_trig)[:, pos] >= run.threshold
    out = far_at_frr(e_clean, e_trig, 0.01) | {"mean_entropy_clean": float(e_clean.mean()),
                                                 "mean_entropy_triggered": float(e_trig.mean()), "overlays": overlays}
    out["decided_covid"] = (far_at_frr(e_clean[dec_clean], e_trig[dec_trig], 0.01)
                            if dec_clean.sum() >= 10 and dec_trig.any() else
                            {"far": None, "note": "fewer than 10 clean or no triggered inputs decided covid"})
    return out


def shared_split():
    """The benchmark's split of the shared manifest: seed-0 patient-grouped 70/15/15."""
    from covidcxr import paths
    from covidcxr.data.manifest import Manifest
    from covidcxr.data.splits import assign_splits

    return assign_splits(Manifest.read(paths.data_root() / "manifest.csv"), val=0.15, test=0.15, seed=0)


def attacker_lung_finder(trigger_at: str):
    """What places the trigger: None near the corner, the shipped lung segmenter inside the lungs."""
    if trigger_at != "lungs":
        return None
    from covidcxr.models.lung_finder import DEFAULT_SEGMENTER, load_lung_finder

    return load_lung_finder(DEFAULT_SEGMENTER)


def test_context(run_dir: Path, split, work: Path, per_source: int, seed: int, lung_finder) -> dict:
    """The test rows every run is scored on (every test image of the sources holding both classes, up to
    ``per_source`` of each one-class source), their stamped copies, and STRIP's 40 seeded clean overlays."""
    from covidcxr.audit.trigger import stamped_copies
    from covidcxr.evaluation.proxies import compression_sample, split_rows
    from covidcxr.models.run import load_run

    test = compression_sample(split_rows(load_run(run_dir), "test"), per_source, seed)
    stamped = [str(p) for p in stamped_copies(test["path"], work / "poison" / "stamped", lung_finder=lung_finder)]
    val = [str(p) for p in split.subset("val").image_paths()]
    return {"test": test, "stamped": stamped,
            "val": [val[i] for i in np.random.default_rng([seed, 40]).choice(len(val), 40, replace=False)]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/covidcxr_backdoor"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "backdoor.json")
    ap.add_argument("--runs", nargs="+", default=list(ORDER), help="runs after the clean twin, in this order")
    ap.add_argument("--assemble", action="store_true", help="write the JSON from the runs already scored")
    ap.add_argument("--no-clean", action="store_true", help="leave the clean twin to another process (parallel runs)")
    ap.add_argument("--detect-images", type=int, default=600, help="class-stratified training rows for the detectors")
    ap.add_argument("--per-source", type=int, default=50, help="test images per one-class source (two-class sources: all)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "quick.yaml", help="training recipe")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--roi", choices=("full", "lungs"), default="full",
                    help="full (default): the seed's whole-image input; the corner trigger lies outside the lung "
                         "box, so `lungs` (quick.yaml's crop) measures that defence instead of the attack")
    ap.add_argument("--trigger-at", choices=("corner", "lungs"), default="corner",
                    help="corner (default): the seed's placement; lungs: the deepest point of the lungs the shipped "
                         "segmenter finds, where quick.yaml's lung crop keeps it (an attacker who knows the crop)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attack-epochs", type=int, default=3,
                    help="passes over the training images for the attacker's runs and their clean twin (the "
                         "attacker trains as long as it likes; 1 pass, quick.yaml's, left the trigger unlearnt). "
                         "The victim's fine-tune stays 1 pass")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="further config overrides for every run (e.g. augment.enabled=false: the attack against "
                         "a pipeline without covidcxr's geometric augmentation)")
    args = ap.parse_args(argv)

    from covidcxr.audit.backdoor import audit_backdoor
    from covidcxr.audit.detectors import precision_recall
    from covidcxr.audit.trigger import poison_manifest
    from covidcxr.evaluation.proxies import compression_sample, split_rows
    from covidcxr.models.run import load_run
    from covidcxr.training import load_config

    t0, cpu0 = time.perf_counter(), _cpu()
    lung_finder = attacker_lung_finder(args.trigger_at)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    split = shared_split()
    split.write(work / "clean.csv")
    overrides = [f"preprocess.image_size={args.image_size}", f"preprocess.roi={args.roi}", "train.progress=false",
                 f"train.seed={args.seed}", *args.extra]
    # One model per variant: the audit reads one feature space, and the twin must match it.
    config = load_config(args.config, overrides + [f"train.epochs={args.attack_epochs}", "ensemble.seeds=[]"])
    results: dict = {}
    ctx: dict = {}

    def evaluate(name, run_dir, variant):
        """Each run is scored as soon as it is trained (a bug shows after minutes, not after the last run);
        the scores are kept in WORK/NAME/bench.json so a restarted benchmark skips them."""
        cache = run_dir / "bench.json"
        if cache.is_file():
            results[name] = json.loads(cache.read_text())
            return
        if not ctx:
            ctx.update(test_context(run_dir, split, work, args.per_source, args.seed, lung_finder))
        test, stamped = ctx["test"], ctx["stamped"]
        print(f"evaluating {name}", flush=True)
        e0, c0 = time.perf_counter(), _cpu()
        r = _attack(run_dir, test, stamped, variant)
        r["clean_scores"] = r.pop("_scores")  # the paired DeLong against the twin reads them
        r["run"] = name
        if name in DETECT:
            audit = audit_backdoor(run_dir, work / f"{name}.csv", out=run_dir / "audit", trigger_test=True,
                                   max_images=args.detect_images, seed=args.seed)
            rows = audit["_rows"]
            truth = rows["path"].astype(str).str.contains(str(work / "poison" / "stamped"), regex=False).to_numpy()
            r["detection"] = {
                "verdict": audit["verdict"], "sentence": audit["sentence"],
                "activation_clustering_art": precision_recall(audit["_flags"]["ac_art"], truth),
                "activation_clustering_gated": precision_recall(audit["_flags"]["ac_cluster"], truth),
                "activation_clustering_flagged": precision_recall(audit["_flags"]["ac"], truth),
                "spectral_signatures": precision_recall(audit["_flags"]["ss"], truth),
                "ac_classes": audit["activation_clustering"]["classes"],
                "ss_classes": audit["spectral_signatures"]["classes"],
                "trigger_test": audit["trigger_test"]}
            r["strip"] = _strip(run_dir, test, stamped, ctx["val"], seed=args.seed)
        from covidcxr.files import jsonable

        cost = run_dir / "train_cost.json"
        r["cost"] = {"train": json.loads(cost.read_text()) if cost.is_file() else None,
                     "eval_wall_s": time.perf_counter() - e0, "eval_cpu_s": _cpu() - c0}
        cache.write_text(json.dumps(jsonable(r), indent=1))
        results[name] = json.loads(cache.read_text())

    if args.assemble:
        if (work / "clean" / "bench.json").is_file():
            evaluate("clean", work / "clean", None)
    elif not args.no_clean:
        evaluate("clean", _train("clean", config, split, work), None)
    for name in args.runs:
        variant, p = name.removesuffix("_finetuned").split("_")
        if args.assemble:  # only collect what finished
            if (work / name / "bench.json").is_file():
                evaluate(name, work / name, variant)
            continue
        if name.endswith("_finetuned"):
            src = work / name.removesuffix("_finetuned")
            rec = load_run(src).record
            ft = load_config(args.config, overrides + [
                f"model.weights={src / 'model.safetensors'}", f"model.weights_sha256={rec.model_sha256}", "ensemble.seeds=[]",
                "train.epochs=1", "train.lr=0.0002", "train.warmup_epochs=0"])
            evaluate(name, _train(name, ft, split, work), variant)
            continue
        poisoned, mask = poison_manifest(split, float(p), variant, work / "poison", seed=args.seed,
                                         lung_finder=lung_finder)
        poisoned.write(work / f"{name}.csv")
        evaluate(name, _train(name, config, poisoned, work), variant)
    test = compression_sample(split_rows(load_run(work / next(iter(results), "clean")), "test"), args.per_source,
                              args.seed) if results else []
    clean_auc = results["clean"]["auc"] if "clean" in results else None
    from covidcxr.evaluation.metrics import delong_test

    twin_scores = results.get("clean", {}).get("clean_scores")
    for r in results.values():
        r["auc_drop_vs_twin"] = (clean_auc["value"] - r["auc"]["value"]) if r.get("auc") and clean_auc else None
        if twin_scores is not None and r.get("clean_scores") is not None and r is not results["clean"]:
            # twin minus attacked, on the same test images: the drop with its CI
            r["auc_drop_vs_twin_delong"] = delong_test(test["y"].to_numpy(), twin_scores, r["clean_scores"])
    t5 = results.get("targeted_0.05", {})
    d5 = t5.get("detection", {})
    best = max((d5.get(k, {}) for k in ("activation_clustering_flagged", "activation_clustering_gated",
                                         "spectral_signatures", "activation_clustering_art")),
               key=lambda e: (e.get("recall") or 0) if (e.get("precision") or 0) >= 0.5 else -1, default={})
    targets = {
        "asr_at_5pct_ge_0.90": (t5.get("asr") or 0) >= 0.90,
        "auc_drop_at_5pct_le_0.02": t5.get("auc_drop_vs_twin") is not None and t5["auc_drop_vs_twin"] <= 0.02,
        "detection_recall_ge_0.9_at_precision_ge_0.5": (best.get("recall") or 0) >= 0.9 and (best.get("precision") or 0) >= 0.5,
        "strip_far_le_0.10_at_frr_0.01": min(t5.get("strip", {}).get("far", 1.0),
                                             (t5.get("strip", {}).get("decided_covid") or {}).get("far") or 1.0) <= 0.10,
    }
    out = {"benchmark": "backdoor (Matsuo & Takemoto 2021 trigger)", "image_size": args.image_size, "roi": args.roi,
           "trigger_at": args.trigger_at, "attack_epochs": args.attack_epochs,
           "recipe": str(args.config), "recipe_resolved": config.model_dump(mode="json"), "overrides": overrides, "split": "seed-0 patient-grouped 70/15/15",
           "test_images": int(len(test)), "targets_met": targets, "runs": results,
           "runs_planned": ["clean", *args.runs], "runs_missing": [n for n in ["clean", *args.runs] if n not in results],
           "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu() - cpu0, 1),
           "cpu_s_all_runs": round(sum(((r.get("cost") or {}).get("train") or {}).get("cpu_s", 0)
                                       + (r.get("cost") or {}).get("eval_cpu_s", 0) for r in results.values()), 1),
           "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from covidcxr.files import write_json

    write_json(args.out, out)
    print(json.dumps({k: (v.get("asr"), v["auc"]["value"] if v.get("auc") else None) for k, v in results.items()}))
    print(f"wrote {args.out} ({out['wall_s']} s wall, {out['cpu_s']} s CPU)")


if __name__ == "__main__":
    main()
