"""Recipe benchmark: train candidate recipes with several seeds, compute the shortcut proxies, compare.

    python bench/recipes.py [--seeds 0 1] [--recipes quick_v1,lpft,...] [--split-seed 1]
                            [--work /tmp/covidcxr_recipes] [--out bench/results/recipes.json]

Every (recipe, seed) trains in its own process (so peak RSS is per run) on one patient-grouped split
of the shared manifest (``--split-seed``, default 1: NOT the seed-0 split that ``scripts/main.sh``
and the tests evaluate on, so choosing a recipe here does not tune on the main job's test split),
then :func:`covidcxr.evaluation.proxies.run_proxies` scores the run's own test rows. Finished
runs are kept under ``--work`` and skipped when the benchmark is started again, so it can be
interrupted and resumed, and seeds can be added later.

The JSON table (``--out``) holds per run: wall / CPU seconds, peak RSS, load average, the selected
epoch, every proxy with its CI; per recipe: the mean and range over seeds; and seed-matched paired
DeLong comparisons of every recipe against ``quick_v1`` on the same test images (plain AUC and the
within-source AUC, the latter pooled over the sources with both classes: per-source paired DeLong,
differences weighted by pairs, variances by squared weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: The shipped configs/quick.yaml before this benchmark (spelled out, so the baseline stays fixed
#: whatever quick.yaml becomes).
QUICK_V1 = [
    "data.label_space=binary", "data.val_max_images=300", "data.validate_images=exists",
    "model.name=tf_efficientnet_lite0", "model.weights=${COVIDCXR_WEIGHTS_DIR}/efficientnet_lite0_imagenet_timm.pth",
    "model.weights_sha256=711997994847d2d492117ee702a3aa7f2e37bc1898d00ffe67e7288f16274ac1", "model.finetune=full",
    "preprocess.image_size=160", "preprocess.intensity=clahe",
    "augment.rotation_deg=10", "augment.scale=[0.9,1.1]", "augment.translate=0.06", "augment.brightness=0.2",
    "augment.contrast=0.2", "augment.strong_intensity=true",
    "train.optimizer=adamw", "train.lr=0.0005", "train.weight_decay=0.0001", "train.schedule=cosine",
    "train.warmup_epochs=0.3", "train.epochs=3", "train.batch_size=16", "train.samples_per_epoch=320",
    "train.sampler=source_balanced", "train.loss_weighting=class_weighted", "train.selection_metric=within_source_auc",
    "train.patience=null",
]
#: The "plain" family: no CLAHE, no strong intensity augmentation, shuffled batches, val-loss
#: selection; 2 epochs x 480 images (the same 960 training images as quick_v1).
PLAIN = QUICK_V1 + [
    "preprocess.intensity=none", "augment.strong_intensity=false", "train.sampler=none", "train.loss_weighting=none",
    "train.selection_metric=val_loss", "train.epochs=2", "train.samples_per_epoch=480",
]
#: LP-FT: 1 epoch linear probe (head lr 0.003) + 2 epochs full fine-tune, backbone at 0.2 x lr.
LPFT = PLAIN + ["train.epochs=3", "train.samples_per_epoch=320", "train.lp_epochs=1", "train.lp_lr=0.003",
                "model.backbone_lr_mult=0.2"]
JPEG = ["augment.jpeg_p=0.5", "augment.jpeg_quality=[30,95]", "augment.jpeg_scale=[1.0,3.0]",
        "augment.resolution_p=0.3", "augment.resolution_scale=[0.4,1.0]"]
#: The same, on the working-size image (before CLAHE / resize), where a re-saved file's artefacts enter.
JPEG_WORKING = ["augment.jpeg_p=0.5", "augment.jpeg_quality=[30,95]", "augment.resolution_p=0.3",
                "augment.resolution_scale=[0.4,1.0]", "augment.storage_stage=working"]
#: Within-source objectives need same-source pairs / every group in the batches: source-balanced
#: sampling with the one-class sources at half weight.
GROUPED = ["train.sampler=source_balanced", "train.single_class_source_weight=0.5", "train.loss_weighting=class_weighted"]

#: Label decomposition needs the 3 classes and source-balanced draws; one-class sources give it no gradient.
DECOMP = ["data.label_space=3class", "train.objective=label_decomposition", "train.sampler=source_balanced",
          "train.single_class_source_weight=0", "train.loss_weighting=none", "train.selection_metric=within_source_auc"]
#: Lung-ROI inputs (the shipped lung segmenter): crop to the lungs + 10%, black outside the dilated lungs.
ROI = ["preprocess.roi=lungs", "preprocess.roi_mask_outside=true", "preprocess.roi_margin=0.1",
       "preprocess.roi_dilate=0.03"]
#: One pass over every training image instead of 2 x 480 draws (the external test of issue 10 peaked after epoch 1).
ONE_PASS = ["train.epochs=1", "train.samples_per_epoch=null"]
WSAUC = PLAIN + GROUPED + ["train.objective=within_source_auc", "train.auc_ce_weight=0.5"]
#: The lung crop black outside the undilated mask, histogram-equalised (the main job's since 2026-12-08).
TIGHT_HISTEQ = ["preprocess.roi_dilate=0.0", "preprocess.intensity=hist_eq"]

RECIPES: dict[str, dict] = {
    "quick_v1": {"overrides": QUICK_V1, "what": "configs/quick.yaml as shipped before: CLAHE, strong intensity aug, "
                 "source-balanced + class-weighted, within-source-AUC selection, 3 x 320"},
    "shuffled": {"overrides": QUICK_V1 + ["train.sampler=none"], "what": "quick_v1 with shuffled batches"},
    "plain": {"overrides": PLAIN, "what": "no CLAHE, no strong aug, shuffled, val-loss selection, 2 x 480"},
    "plain_jpeg": {"overrides": PLAIN + JPEG, "what": "plain + JPEG re-compression (q30-95, x1-3) p=0.5 "
                   "+ downscale-upscale (0.4-1) p=0.3"},
    "lpft": {"overrides": LPFT, "what": "plain, LP-FT: 1 epoch head only (lr 0.003), 2 epochs full, backbone lr x0.2"},
    "lpft_jpeg": {"overrides": LPFT + JPEG, "what": "lpft + the JPEG / resolution augmentation"},
    "plain_jpegw": {"overrides": PLAIN + JPEG_WORKING, "what": "plain + JPEG (q30-95) p=0.5 + downscale-upscale "
                    "(0.4-1) p=0.3 on the working-size image (storage_stage=working)"},
    "lpft_jpegw": {"overrides": LPFT + JPEG_WORKING, "what": "lpft + the working-stage JPEG / resolution augmentation"},
    "wsauc": {"overrides": WSAUC,
              "what": "plain + within-source pairwise AUC loss + 0.5 CE, source-balanced (one-class sources x0.5)"},
    "group_dro": {"overrides": PLAIN + GROUPED + ["train.objective=group_dro", "train.dro_eta=0.05"],
                  "what": "plain + group DRO over (source, class), eta 0.05, source-balanced (one-class sources x0.5)"},
    "dann": {"overrides": PLAIN + ["train.source_adversarial_weight=0.3", "train.source_adversarial_schedule=dann"], "what": "plain + DANN adversary 0.3"},
    "quick_yaml": {"config": "configs/quick.yaml", "overrides": [], "what": "configs/quick.yaml as it is now"},
    "decomp": {"overrides": PLAIN + DECOMP, "what": "plain + label decomposition (3class): P(abnormal) on pneumonia "
               "vs normal inside sources x P(covid | abnormal) on COVID vs pneumonia inside sources; "
               "source-balanced, one-class sources not drawn, within-source-AUC selection"},
    "wsauc_roi": {"overrides": WSAUC + ROI, "what": "wsauc on lung-ROI inputs: crop to the shipped segmenter's "
                  "lung box + 10%, black outside the lungs dilated by 3%"},
    "decomp_roi": {"overrides": PLAIN + DECOMP + ROI, "what": "decomp on the same lung-ROI inputs"},
    "wsauc_roi_1pass": {"overrides": WSAUC + ROI + ONE_PASS,
                        "what": "wsauc_roi for one pass over every training image (issue 10: after the first pass "
                        "training learns the source)"},
    "wsauc_roi_1pass_abn": {"overrides": WSAUC + ROI + ONE_PASS + ["train.auc_abnormal_weight=1.0"],
                            "what": "wsauc_roi_1pass + a second within-source pairwise term (weight 1) that ranks "
                            "pneumonia / other above normal inside every source (NIH, Kermany, ieee8023, Figure1)"},
    "wspairs_roi_1pass": {"overrides": WSAUC + ROI + ONE_PASS + ["train.auc_abnormal_weight=1.0", "train.auc_ce_weight=0"],
                          "what": "wsauc_roi_1pass_abn without the cross-entropy term: every gradient compares two "
                          "images of one source (COVID above the rest, disease above normal), so a collection's look "
                          "can lower no term"},
    "plain_1pass": {"overrides": PLAIN + ONE_PASS,
                    "what": "plain (CE, shuffled, full images) for one pass over every training image: the recipe "
                    "closest to issue 10's best external row (a plain fine-tune after epoch 1)"},
    "plain_roi_1pass": {"overrides": PLAIN + ROI + ONE_PASS,
                        "what": "plain (CE, shuffled) on lung-ROI inputs, one pass over every training image"},
    "linear_1pass": {"overrides": PLAIN + ONE_PASS + ["model.finetune=linear", "train.lr=0.003"],
                     "what": "a linear head on the frozen ImageNet backbone (CE, shuffled, full images), one pass: "
                     "issue 10's 'linear head only' row scored the best same-hospital AUC of its table (0.80)"},
    "linear_roi_1pass": {"overrides": PLAIN + ROI + ONE_PASS + ["model.finetune=linear", "train.lr=0.003"],
                         "what": "linear_1pass on lung-ROI inputs"},
    "wsauc_roi_1pass_224": {"overrides": WSAUC + ROI + ONE_PASS + ["preprocess.image_size=224"],
                            "what": "wsauc_roi_1pass at 224 px instead of 160 (the seeds train at 224-480 px; ground "
                            "glass is texture, which a 160 px lung crop blurs)"},
    "wsauc_roi_1pass_mnv2": {"overrides": WSAUC + ROI + ONE_PASS + [
        "model.name=mobilenet_v2",
        "model.weights=${COVIDCXR_WEIGHTS_DIR}/mobilenet_v2_imagenet_features_torchvision.pth",
        "model.weights_sha256=2f3656925dbcba43a561f7fa0d7f00d433df053f0597ae570d72e2ef6614de20"],
                             "what": "wsauc_roi_1pass with an ImageNet MobileNetV2 (the other offline weights) instead "
                             "of EfficientNet-Lite0: a second architecture for a mixed ensemble, as DeepCOVID-XR mixes "
                             "architectures"},
    "wsauc_roi_1pass_histeq": {"overrides": WSAUC + ROI + ONE_PASS + ["preprocess.intensity=hist_eq"],
                               "what": "wsauc_roi_1pass with histogram equalisation of the lung crop (black outside "
                               "stays black): every monotone change of grey levels - a collection's window, gamma, "
                               "contrast - gives the model the same input"},
    "wsauc_roi_1pass_noclsw": {"overrides": WSAUC + ROI + ONE_PASS + ["train.loss_weighting=none"],
                               "what": "wsauc_roi_1pass without class weights: class weights on top of source-balanced "
                               "draws weight COVID 1.75 against 0.70, so inside ieee8023 / Figure1 the cross-entropy "
                               "sees 71% COVID and a collection's look alone earns P(covid) 0.71; without them 0.5"},
    "wsauc_roi_1pass_gentle": {"overrides": WSAUC + ROI + ONE_PASS + ["model.backbone_lr_mult=0.3"],
                               "what": "wsauc_roi_1pass with the backbone at 0.3 x the head's learning rate (partial / "
                               "gentler fine-tuning: issue 10's frozen-backbone head scored 0.80 on the same-hospital "
                               "test, above every fully fine-tuned recipe but one)"},
    "wsauc_roi_1pass_tight": {"overrides": WSAUC + ROI + ONE_PASS + ["preprocess.roi_dilate=0.0"],
                              "what": "wsauc_roi_1pass black outside the lungs themselves (roi_dilate 0 instead of "
                              "0.03): the 3% rim keeps chest wall, soft tissue and the heart's edge, which carry the "
                              "patient's build and a collection's look (with the lungs blacked out, the main job "
                              "still scored AUC 0.64 from that rim)"},
    "wsauc_roi_1pass_tight_histeq": {"overrides": WSAUC + ROI + ONE_PASS + TIGHT_HISTEQ,
                                     "what": "wsauc_roi_1pass_tight + wsauc_roi_1pass_histeq: the lungs alone, "
                                     "equalised (tight scored best out of fold, histeq best on a held-out collection)"},
    "wsauc_roi_1pass_histeq_rim1": {"overrides": WSAUC + ROI + ONE_PASS + ["preprocess.roi_dilate=0.01",
                                                                          "preprocess.intensity=hist_eq"],
                                    "what": "wsauc_roi_1pass_tight_histeq with a 1% rim: does moving the mask's edge "
                                    "off the lung tissue make it less sensitive to re-compression (the moved mask "
                                    "caused 55% of tight_histeq's JPEG change, 35% with the 3% rim)?"},
    "wsauc_roi_1pass_tight_histeq_jpegw": {"overrides": WSAUC + ROI + ONE_PASS + TIGHT_HISTEQ + JPEG_WORKING,
        "what": "wsauc_roi_1pass_tight_histeq (the main job's since 2026-12-08) + the working-stage JPEG / resolution "
        "augmentation, lungs segmented again on each changed image (its scorecard's worst change was a 4x "
        "downscale-upscale)"},
    "wsauc_roi_jpegw": {"overrides": WSAUC + ROI + JPEG_WORKING,
                        "what": "wsauc_roi + JPEG (q30-95) p=0.5 and downscale-upscale (0.4-1) p=0.3 of every class "
                        "on the working-size image, before the lung crop (issue 10: compression is a shortcut)"},
    "wsauc_roi_1pass_jpegw": {"overrides": WSAUC + ROI + ONE_PASS + JPEG_WORKING,
                              "what": "wsauc_roi_1pass + the working-stage JPEG / resolution augmentation, the lungs "
                              "segmented again on each changed image as inference does on a re-saved file"},
}
DEFAULT_RECIPES = ["quick_v1", "shuffled", "plain", "plain_jpeg", "plain_jpegw", "lpft", "lpft_jpeg", "lpft_jpegw",
                   "wsauc", "group_dro"]
BASELINE = "quick_v1"  # --baseline changes it


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("COVIDCXR_DATA_ROOT", str(REPO.parent / "shared" / "data" / "cxr"))
    env.setdefault("COVIDCXR_WEIGHTS_DIR", str(REPO.parent / "shared" / "weights"))
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def split_manifest(work: Path, seed: int) -> Path:
    from covidcxr.data.manifest import Manifest
    from covidcxr.data.splits import assign_splits
    from covidcxr.paths import data_root

    path = work / f"manifest_split{seed}.csv"
    if not path.exists():
        m = assign_splits(Manifest.read(data_root() / "manifest.csv"), val=0.15, test=0.15, seed=seed)
        m.write(path)
    return path


# ---------------------------------------------------------------- one run (child process)


def run_one(recipe: str, seed: int, work: Path, manifest: Path, threads: int, extra: list[str]) -> None:
    from covidcxr.evaluation.proxies import run_proxies, summary_line
    from covidcxr.training import run_training

    spec = RECIPES[recipe]
    out = work / "runs" / f"{recipe}_s{seed}"
    run_dir = out / "run"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if not (run_dir / "run.json").exists():
        resume = (run_dir / "checkpoints" / "last.pt").exists()
        config = str(REPO / spec["config"]) if spec.get("config") else None
        run_training(config, run_dir, overrides=spec["overrides"] + [
            f"data.manifest={manifest}", f"train.seed={seed}", f"train.threads={threads}", "train.progress=false", *extra],
            resume=resume)
    train_s = time.perf_counter() - t0
    proxies = run_proxies(run_dir, out / "proxies", work_dir=work / "images")
    proxies.pop("_scores", None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = json.loads((run_dir / "run.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {
        "recipe": recipe, "seed": seed, "train_wall_s": round(train_s, 1),
        "proxy_wall_s": proxies["seconds"], "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "selection": record["info"]["selection"], "threshold": record["threshold"],
        "epochs": [{k: m.get(k) for k in ("epoch", "phase", "train_loss", "val_loss", "val_auc", "val_within_source_auc",
                                          "images_per_s", "selected")} for m in metrics],
        "proxies": proxies,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    print(f"{recipe} seed {seed}: {summary_line(proxies)} ({result['wall_s']} s)", flush=True)


# ---------------------------------------------------------------- aggregation


def _scores(work: Path, recipe: str, seed: int) -> pd.DataFrame:
    return pd.read_csv(work / "runs" / f"{recipe}_s{seed}" / "proxies" / "proxy_scores.csv")


def paired_within_source(y, a, b, sources) -> dict:
    """Paired DeLong for the within-source AUC: per source with >= 2 of each class, pooled by pair weights."""
    from covidcxr.evaluation.metrics import delong_test
    from covidcxr.evaluation.within_source import defined_sources

    y, a, b, sources = np.asarray(y), np.asarray(a), np.asarray(b), np.asarray(sources).astype(str)
    used = defined_sources(y, sources)
    parts, total = [], 0
    for s in used:
        m = sources == s
        t = delong_test(y[m], a[m], b[m])
        pairs = int(y[m].sum() * (1 - y[m]).sum())
        parts.append((t, pairs))
        total += pairs
    if not total:
        return {"difference": None, "note": "no source with >= 2 images of each class"}
    diff = sum(t["difference"] * p / total for t, p in parts)
    se = float(np.sqrt(sum((p / total) ** 2 * t["se"] ** 2 for t, p in parts)))
    from scipy import stats

    pval = float(2 * stats.norm.sf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {"difference": float(diff), "ci_low": float(diff - 1.96 * se), "ci_high": float(diff + 1.96 * se),
            "se": se, "p_value": pval, "sources": used, "method": "per-source paired DeLong, pooled by pair weights"}


def comparisons(work: Path, recipes: list[str], seeds: list[int], done: set, baseline: str = BASELINE) -> list[dict]:
    from covidcxr.evaluation.metrics import delong_test

    out = []
    for recipe in recipes:
        if recipe == baseline:
            continue
        for seed in seeds:
            if (recipe, seed) not in done or (baseline, seed) not in done:
                continue
            a, b = _scores(work, recipe, seed), _scores(work, baseline, seed)
            t = a.merge(b[["image", "score"]], on="image", suffixes=("", "_base"))
            y, src = t["y"].to_numpy(), t["source"].to_numpy()
            plain = delong_test(y, t["score"], t["score_base"])
            out.append({"recipe": recipe, "versus": baseline, "seed": seed, "n": int(len(t)),
                        "auc": {k: plain[k] for k in ("difference", "ci_low", "ci_high", "p_value")},
                        "within_source_auc": paired_within_source(y, t["score"], t["score_base"], src)})
    return out


def _get(d: dict, path: str):
    for k in path.split("."):
        if d is None:
            return None
        d = d.get(k)
    return d


#: headline columns: (name, path in proxies.json, CI?)
COLUMNS = [
    ("within_src_auc", "discrimination.within_source_auc", True),
    ("auc", "discrimination.auc", True),
    ("cross_src_auc", "discrimination.cross_source_auc", True),
    ("q70_abs_dP", "compression.qualities.q70.mean_abs_change", True),
    ("q50_abs_dP", "compression.qualities.q50.mean_abs_change", True),
    ("q50_neg_dP", "compression.qualities.q50.negatives.mean_change", True),
    ("no_lungs_auc", "lungs.no_lungs.auc", True),
    ("lungs_only_auc", "lungs.lungs_only.auc", True),
    ("own_lungs_dP_pos", "lungs.own_lungs_removed_positives.mean_change", True),
    ("source_probe_bacc", "source_probe", True),
]


def summarise(results: list[dict]) -> dict:
    table = {}
    by_recipe: dict[str, list[dict]] = {}
    for r in results:
        by_recipe.setdefault(r["recipe"], []).append(r)
    for recipe, runs in by_recipe.items():
        row = {"seeds": sorted(r["seed"] for r in runs), "what": RECIPES[recipe]["what"],
               "wall_s_mean": float(np.mean([r["wall_s"] for r in runs])),
               "train_wall_s_mean": float(np.mean([r["train_wall_s"] for r in runs])),
               "peak_rss_mb_max": float(max(r["peak_rss_mb"] for r in runs))}
        for name, path, _ in COLUMNS:
            vals = [_get(r["proxies"], path) for r in runs]
            points = [v.get("value") for v in vals if v is not None and v.get("value") is not None]
            row[name] = {"mean": float(np.mean(points)) if points else None,
                         "min": float(np.min(points)) if points else None,
                         "max": float(np.max(points)) if points else None,
                         "per_seed": [{"seed": r["seed"], "value": v.get("value") if v else None,
                                       "ci_low": v.get("ci_low") if v else None, "ci_high": v.get("ci_high") if v else None}
                                      for r, v in zip(runs, vals)]}
        table[recipe] = row
    return table


def imagenet_reference(work: Path, manifest: Path) -> dict:
    """Source probe of the ImageNet (not fine-tuned) Lite0 features on the same test images, both
    preprocessings: what any recipe starts from."""
    import torch

    from covidcxr.data.manifest import Manifest
    from covidcxr.evaluation.proxies import source_probe
    from covidcxr.models.predict import prepare_input
    from covidcxr.models.registry import create_model, get_architecture, resolve_spec

    path = work / "imagenet_reference.json"
    if path.exists():
        return json.loads(path.read_text())
    m = Manifest.read(manifest)
    t = m.table.reset_index(drop=True)
    test = (t["split"] == "test").to_numpy() & t["label"].isin(["covid", "normal", "pneumonia", "other"]).to_numpy()
    paths = [p for p, k in zip(m.image_paths(), test) if k]
    rows = t[test]
    weights = Path(_env()["COVIDCXR_WEIGHTS_DIR"]) / "efficientnet_lite0_imagenet_timm.pth"
    model = create_model("tf_efficientnet_lite0", 2, weights=str(weights)).eval()
    head = get_architecture("tf_efficientnet_lite0").head(model)[0].rstrip(".")
    out = {}
    for intensity in ("clahe", "none"):
        spec = resolve_spec({"image_size": 160, "intensity": intensity}, "tf_efficientnet_lite0")
        feats: list = []
        h = model.get_submodule(head).register_forward_pre_hook(lambda mod, a: feats.append(a[0].flatten(1).numpy()))
        with torch.no_grad():
            for i in range(0, len(paths), 32):
                model(torch.stack([prepare_input(p, spec).tensor for p in paths[i:i + 32]]))
        h.remove()
        out[intensity] = source_probe(np.concatenate(feats), rows["source"], rows["patient_id"])
    path.write_text(json.dumps(out, indent=1))
    return out


def print_table(table: dict, comps: list[dict]) -> None:
    names = [c[0] for c in COLUMNS]
    print("recipe".ljust(12) + "".join(n[:17].rjust(18) for n in names) + "  wall_s  rss_MB")
    for recipe, row in table.items():
        cells = []
        for n in names:
            c = row[n]
            cells.append(("-" if c["mean"] is None else f"{c['mean']:.3f} ({c['min']:.2f}-{c['max']:.2f})").rjust(18))
        print(recipe.ljust(12) + "".join(cells) + f"  {row['wall_s_mean']:6.0f}  {row['peak_rss_mb_max']:6.0f}")
    print("\npaired DeLong vs", comps[0]["versus"] if comps else BASELINE, "(same test images, same seed): within-source AUC difference [95% CI] p")
    for c in comps:
        w = c["within_source_auc"]
        if w.get("difference") is None:
            continue
        print(f"  {c['recipe']:<11} seed {c['seed']}: {w['difference']:+.3f} [{w['ci_low']:+.3f}, {w['ci_high']:+.3f}] "
              f"p={w['p_value']:.3f} | AUC {c['auc']['difference']:+.3f} p={c['auc']['p_value']:.3f}")


def merge(files: list[str], out: str) -> None:
    """One table over the runs of several result files (same split seed), comparisons concatenated."""
    from covidcxr.files import write_json

    parts = [json.loads(Path(f).read_text()) for f in files]
    if len({p["split_seed"] for p in parts}) != 1:
        raise SystemExit("the result files use different split seeds; their test splits differ")
    runs = [r for p in parts for r in p["runs"]]
    recipes = list(dict.fromkeys(r["recipe"] for r in runs))
    table = summarise(runs)
    comps = [c for p in parts for c in p["comparisons_vs_baseline"]]
    write_json(out, {
        "what": __doc__.split("\n\n")[0] + " (merged)", "merged_from": [str(f) for f in files],
        "split_seed": parts[0]["split_seed"], "seeds": sorted({r["seed"] for r in runs}),
        "recipes": {r: RECIPES[r] for r in recipes}, "baseline": parts[0].get("baseline", BASELINE), "table": table,
        "comparisons_vs_baseline": comps, "imagenet_features_source_probe": parts[0]["imagenet_features_source_probe"],
        "runs": runs, "failures": [f for p in parts for f in p["failures"]], "note": parts[0]["note"],
    })
    print_table(table, comps)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    ap.add_argument("--split-seed", type=int, default=1)
    ap.add_argument("--work", default="/tmp/covidcxr_recipes")
    ap.add_argument("--out", default=str(HERE / "results" / "recipes.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=BASELINE, help="recipe every other one is compared with (paired DeLong)")
    ap.add_argument("--one", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides appended to every recipe (smoke tests)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine result files of earlier runs of this "
                    "benchmark (e.g. other seeds) into one table in --out; trains nothing")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for k, v in _env().items():
        os.environ.setdefault(k, v)
    manifest = split_manifest(work, args.split_seed)
    if args.one:
        run_one(args.one[0], int(args.one[1]), work, manifest, args.threads, args.extra)
        return
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    t0 = time.perf_counter()
    failures = []
    if not args.aggregate_only:
        for seed in args.seeds:  # all recipes of a seed first: a partial benchmark still compares recipes
            for recipe in recipes:
                if (work / "runs" / f"{recipe}_s{seed}" / "result.json").exists():
                    continue
                cmd = [sys.executable, __file__, "--one", recipe, str(seed), "--work", str(work),
                       "--split-seed", str(args.split_seed), "--threads", str(args.threads)]
                if args.extra:
                    cmd += ["--extra", *args.extra]
                proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
                (work / "runs").mkdir(exist_ok=True)
                (work / "runs" / f"{recipe}_s{seed}.log").write_text(proc.stdout + proc.stderr)
                if proc.returncode != 0:
                    failures.append({"recipe": recipe, "seed": seed, "error": proc.stderr[-2000:]})
                    print(f"{recipe} seed {seed}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                else:
                    print(proc.stdout.strip().splitlines()[-1], flush=True)
    results, done = [], set()
    for recipe in recipes:
        for seed in args.seeds:
            p = work / "runs" / f"{recipe}_s{seed}" / "result.json"
            if p.exists():
                results.append(json.loads(p.read_text()))
                done.add((recipe, seed))
    table = summarise(results)
    comps = comparisons(work, recipes, args.seeds, done, args.baseline)
    reference = imagenet_reference(work, manifest)
    from covidcxr.files import write_json

    write_json(args.out, {
        "what": __doc__.split("\n\n")[0], "split_seed": args.split_seed, "seeds": args.seeds,
        "recipes": {r: RECIPES[r] for r in recipes}, "baseline": args.baseline, "table": table,
        "comparisons_vs_baseline": comps, "imagenet_features_source_probe": reference, "runs": results, "failures": failures,
        "bench_wall_s": round(time.perf_counter() - t0, 1), "cpu_count": os.cpu_count(),
        "note": "CIs: DeLong for AUCs (within-source: pooled over sources with >= 2 images of each class), "
                "patient bootstrap for mean probability changes and the source probe; the test split is the "
                "split-seed's, never used for training, checkpoint or threshold selection.",
    })
    print_table(table, comps)
    print("ImageNet features source probe:", {k: round(v["value"], 3) for k, v in reference.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
