"""Explanation quality of a trained run on the shared data: lung focus, sanity check, ROAD, severity.

    .venv/bin/python bench/explain_quality.py RUN_DIR --manifest SPLIT_MANIFEST [--split test]

* lung focus (mass share / pointing game vs the uniform baseline) of several CAM methods on every
  image of ``--split`` that has a lung annotation;
* model-randomisation sanity check (full) of the same methods on up to 8 of those images;
* ROAD (gradcam) on up to 8 of them;
* severity correlation on the 92 expert-scored images, and the same restricted to those in ``--split``.

Writes ``bench/results/explain_quality.json`` (plus the usual explain outputs under
``--work``) with wall time and peak RSS. Single-threaded CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "explain_quality.json"


def main() -> None:
    import torch

    from covidcxr import paths
    from covidcxr.data.manifest import Manifest
    from covidcxr.data.annotations import Annotations
    from covidcxr.explain.images import explain_images
    from covidcxr.explain.sanity import sanity_check
    from covidcxr.explain.severity import severity_study
    from covidcxr.models.run import load_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--manifest", type=Path, required=True, help="the split manifest the run was trained with")
    ap.add_argument("--split", default="test")
    ap.add_argument("--methods", default="gradcam,gradcam++,eigencam")
    ap.add_argument("--work", type=Path, default=Path("/tmp/covidcxr-explain-quality"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    root = paths.data_root()
    ann = Annotations(root / "annotations")
    manifest = Manifest.read(args.manifest)
    table = manifest.table.assign(path=[str(p) for p in manifest.image_paths()])
    rows = table[table["split"] == args.split]
    images = [p for p in rows["path"] if ann.available(p)]
    run = load_run(args.run_dir)
    result = {"run_dir": str(args.run_dir), "model_sha256": run.model_sha256, "split": args.split,
              "n_annotated_images": len(images), "lung_focus": {}, "road": None}
    for method in args.methods.split(","):
        s = explain_images(args.run_dir, images, method=method, out=args.work / method, run=run)
        result["lung_focus"][method] = s["lung_focus_summary"]
        print(method, s["lung_focus_summary"], flush=True)
    s = explain_images(args.run_dir, images[:8], method="gradcam", out=args.work / "road", run=run, road=True)
    result["road"] = {"n": len(s["images"]), **s["road_summary"]}
    print("road", result["road"], flush=True)
    sanity = sanity_check(args.run_dir, images[:8], methods=args.methods.split(","), mode="full", run=run,
                          out=args.work / "sanity")
    result["sanity_full"] = {m: {k: v for k, v in e.items() if k != "rho_per_image"} for m, e in sanity["methods"].items()}
    print("sanity", result["sanity_full"], flush=True)
    sev = severity_study(args.run_dir, run=run, out=args.work / "severity")
    result["severity_all_92"] = {"n_images": sev["n_images"], "n_patients": sev["n_patients"],
                                 "correlations": sev["correlations"]}
    # Severity rows name images relative to the data root; the manifest's paths may be relative to elsewhere.
    key_of = {ann.relative_key(p): pid for p, pid in zip(rows["path"], rows["patient_id"])}
    in_split = set(key_of)
    held = [r for r in sev["images"] if r["image"] in in_split]
    result["severity_scored_images_in_split"] = len(held)
    if len(held) >= 5:
        from covidcxr.explain.severity import PREDICTORS, SCORES, spearman_ci

        clusters = [key_of[r["image"]] for r in held]
        result["severity_in_split"] = {p: {s_: spearman_ci([r[p] for r in held], [r[s_] for r in held], clusters=clusters)
                                           for s_ in SCORES} for p in PREDICTORS}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
