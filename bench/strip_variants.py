"""Why STRIP misses its target on covidcxr's models: the variants a defender would try next, measured.

    python bench/strip_variants.py --work WORK [--trigger-at corner|lungs] [--seed 0] [--run targeted_0.05]
                                   [--name NAME] [--out bench/results/strip_variants.json]

``WORK`` is a finished ``bench/backdoor.py`` work folder (same ``--trigger-at`` and ``--seed``); its
attacked run and the very inputs its STRIP used are reloaded (:func:`backdoor.strip_inputs`). STRIP
(Gao et al. 2019) blends an input with clean images and calls it triggered when its prediction stays
certain. On a two-class model most clean inputs stay certain too, so this script tries what would
make the two differ more, each at 1% false rejection of the clean inputs *decided covid* (the class
the attack forces) against the triggered inputs decided covid:

* overlays: the clean validation images STRIP uses, or only those the run decides non-covid (a clean
  covid image blended with a negative should lose its certainty; a forced one should not);
* blend weight of the overlay: 0.5 (STRIP's) or 0.7 (a fainter input, a fainter trigger);
* statistic: the mean class entropy (STRIP's; low is suspicious), or the mean / median P(covid) over
  the blends (high is suspicious; it keeps what saturated entropies round away).

Each variant's false acceptance at that operating point and the AUC of its statistic (triggered
against clean, 1.0 = perfectly apart) go to ``--out``, merged under ``--name``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("COVIDCXR_DATA_ROOT", str(HERE.parent.parent / "shared" / "data" / "cxr"))
os.environ.setdefault("COVIDCXR_WEIGHTS_DIR", str(HERE.parent.parent / "shared" / "weights"))


def _statistics(p: np.ndarray, pos: int) -> dict:
    """Per input, each statistic oriented so that *higher is more suspicious*."""
    entropy = (-(p * np.log2(np.clip(p, 1e-12, 1))).sum(axis=2)).mean(axis=1)
    return {"entropy": -entropy, "mean_p_covid": p[:, :, pos].mean(axis=1),
            "median_p_covid": np.median(p[:, :, pos], axis=1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="a finished bench/backdoor.py work folder")
    ap.add_argument("--trigger-at", choices=("corner", "lungs"), default="corner")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default="targeted_0.05")
    ap.add_argument("--per-source", type=int, default=50)
    ap.add_argument("--overlays", type=int, default=16)
    ap.add_argument("--name", default=None, help="key in --out (default: the work folder's name)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "strip_variants.json")
    args = ap.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from backdoor import attacker_lung_finder, shared_split, strip_inputs, test_context
    from covidcxr.audit.detectors import blend_predictions, far_at_frr
    from covidcxr.errors import CovidCXRError
    from covidcxr.models.run import load_run

    run_dir = args.work / args.run
    if not (run_dir / "run.json").is_file():
        raise CovidCXRError(f"{run_dir}: no finished run; run bench/backdoor.py with --work {args.work} first")
    t0 = time.perf_counter()
    ctx = test_context(run_dir, shared_split(), args.work, args.per_source, args.seed,
                       attacker_lung_finder(args.trigger_at))
    run = load_run(run_dir)
    x_clean, x_trig, pool = strip_inputs(run, ctx["test"], ctx["stamped"], ctx["val"], args.seed)
    pos = run.classes.index(run.positive_class)
    decided = lambda x: run.predict_tensor(x)[:, pos] >= run.threshold  # noqa: E731
    dec_clean, dec_trig = decided(x_clean), decided(x_trig)
    pools = {"clean": pool, "decided_negative": pool[~decided(pool)]}
    variants = []
    for pool_name, overlay_pool in pools.items():
        for weight in (0.5, 0.7):
            stats_clean = _statistics(blend_predictions(run, x_clean[dec_clean], overlay_pool, overlays=args.overlays,
                                                        seed=args.seed, weight=weight), pos)
            stats_trig = _statistics(blend_predictions(run, x_trig[dec_trig], overlay_pool, overlays=args.overlays,
                                                       seed=args.seed + 1, weight=weight), pos)
            for stat in stats_clean:
                # far_at_frr calls inputs at or below its threshold triggered: negate "higher is suspicious"
                op = far_at_frr(-stats_clean[stat], -stats_trig[stat], 0.01)
                auc = roc_auc_score(np.r_[np.zeros(len(stats_clean[stat])), np.ones(len(stats_trig[stat]))],
                                    np.r_[stats_clean[stat], stats_trig[stat]])
                variants.append({"overlays": pool_name, "overlay_images": int(len(overlay_pool)), "weight": weight,
                                 "statistic": stat, "far_at_frr_0.01": op["far"], "frr": op["frr"],
                                 "auc_triggered_vs_clean": float(auc)})
                print(f"{pool_name:16s} weight {weight}  {stat:14s} FAR {op['far']:.3f}  AUC {auc:.3f}", flush=True)
    best = min(variants, key=lambda v: v["far_at_frr_0.01"])
    entry = {"work": str(args.work), "run": args.run, "trigger_at": args.trigger_at, "seed": args.seed,
             "clean_decided_covid": int(dec_clean.sum()), "triggered_decided_covid": int(dec_trig.sum()),
             "blends_per_input": args.overlays, "variants": variants, "lowest_far": best,
             "target_far_le_0.10_met": best["far_at_frr_0.01"] <= 0.10, "wall_s": round(time.perf_counter() - t0, 1)}
    from covidcxr.files import write_json

    results = json.loads(args.out.read_text()) if args.out.is_file() else {
        "benchmark": "STRIP variants on backdoored covidcxr runs (bench/strip_variants.py)", "runs": {}}
    results["runs"][args.name or args.work.name] = entry
    write_json(args.out, results)
    print(f"lowest false acceptance {best['far_at_frr_0.01']:.3f} ({best['overlays']}, weight {best['weight']}, "
          f"{best['statistic']}); wrote {args.out}")


if __name__ == "__main__":
    main()
