"""Package a trained lung segmenter as the one shipped with covidcxr (``data.lung_segmenter: default``).

    .venv/bin/python scripts/package_segmenter.py RUN_DIR [--out src/covidcxr/models/assets/lung_segmenter]

The float32 U-Net is 16.5 MB; the repository takes at most 10 MB, so the weights are stored as float16
safetensors (8.3 MB; ``load_segmenter`` loads them into the float32 model). The held-out patients of the
run are scored again with the float16 weights, so the shipped record's Dice / HD95 are the shipped
model's, and the float32 numbers stay beside them. The record keeps the run's config, data hashes
(manifest, annotation index, masks), split and history, plus the command that trained it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "covidcxr" / "models" / "assets" / "lung_segmenter"


def main() -> None:
    from safetensors.torch import save_file

    from covidcxr.evaluation.segmentation import summarise_scores
    from covidcxr.models.record import MODEL_FILE, write_run_record
    from covidcxr.models.segmenter import load_segmenter
    from covidcxr.models.weights import sha256_file
    from covidcxr.paths import data_root
    from covidcxr.training.segment import SegmentConfig, _held_out
    from covidcxr.evaluation.segmentation import template_mask
    from covidcxr.training.segment_data import load_samples, mask_table, split_masks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--command", default="covidcxr segment train --out runs/lung_segmenter image_size=256 "
                    "working_size=512 intensity=clahe epochs=18 batch_size=8 lr=0.002 threads=2 seed=0")
    args = ap.parse_args()
    seg = load_segmenter(args.run_dir)  # integrity + SHA-256 checked
    record = seg.record
    half = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in seg.model.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(half, str(args.out / MODEL_FILE))
    for name in ("split.csv",):
        if (args.run_dir / name).is_file():
            shutil.copyfile(args.run_dir / name, args.out / name)

    # Score the held-out patients again with the float16 weights (loaded into the float32 model).
    seg.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    cfg = SegmentConfig(**record.config)
    root = Path(cfg.data_root) if cfg.data_root else data_root()
    table = split_masks(mask_table(root, cfg.kinds), val=cfg.val, test=cfg.test, seed=cfg.seed,
                        max_masks=cfg.max_masks, root=root)
    samples, _ = load_samples(table, root, seg.spec)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    template = template_mask([s.target >= 0.5 for s in train], [s.weight for s in train])
    with torch.no_grad():
        scores, _ = _held_out(seg, test, template)
    import pandas as pd

    fp16 = summarise_scores(pd.DataFrame({"dice": scores["dice"], "hd95": scores["hd95_px"]}),
                            scores["patient_id"].to_numpy(), n_boot=cfg.n_boot)
    metrics = dict(record.metrics)
    metrics["test_float32"] = metrics.get("test")
    metrics["test"] = fp16
    info = dict(record.info)
    info.update(weights_dtype="float16 (loaded into the float32 model)", trained_by=args.command,
                packaged_from_model_sha256=record.model_sha256,
                packaged_by="scripts/package_segmenter.py")
    shipped_record = record.model_copy(update={"model_sha256": sha256_file(args.out / MODEL_FILE), "metrics": metrics,
                                               "info": info, "integrity": None})
    write_run_record(args.out, shipped_record)
    check = load_segmenter(args.out)
    size = (args.out / MODEL_FILE).stat().st_size / 2**20
    d32, d16 = metrics["test_float32"]["dice"], fp16["dice"]
    print(f"wrote {args.out} ({size:.1f} MiB weights, sha256 {check.record.model_sha256[:16]}...); held-out Dice "
          f"float32 {d32['mean']:.4f} -> float16 {d16['mean']:.4f} over {len(test)} images", flush=True)
    if not np.isfinite(d16["mean"]) or size > 10:
        sys.exit("packaging check failed (Dice not finite or weights over 10 MB)")


if __name__ == "__main__":
    main()
