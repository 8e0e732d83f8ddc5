"""Training throughput: ``covidcxr train`` against a plain ImageFolder + DataLoader + AdamW loop, side by side.

    .venv/bin/python bench/train_vs_plain.py [--images 64] [--rounds 2] [--workers 0]

Same model (``configs/quick.yaml``: tf_efficientnet_lite0 from the shared ImageNet weights), input
size (160 px), batch (16), optimiser (AdamW, lr 5e-4) and number of training images per epoch.
The plain loop is what a researcher would write: ``torchvision.datasets.ImageFolder`` over the same
training JPEGs (symlinked into class folders), ``RandomAffine`` + ``ColorJitter`` + ``Resize`` +
``ToTensor`` + ``Normalize``, a DataLoader, cross-entropy. covidcxr runs ``fit`` with the quick
config (source-balanced batches, the within-source AUC objective, working-size cache); only its
``train_seconds`` (the epoch's training loop, no validation or run writing) is compared.

The two alternate ``--rounds`` times in one process (round 1 also fills covidcxr's working-size
cache, so compare the later rounds). For the plain loop the share of wall time spent waiting for
data is measured. Writes ``bench/results/train_vs_plain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "train_vs_plain.json"


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def plain_epoch(folder: Path, weights: Path, workers: int, size: int = 160, batch: int = 16) -> dict:
    import timm
    import torch
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=2)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier")}, strict=False)
    cfg = model.default_cfg
    tf = transforms.Compose([transforms.Grayscale(3), transforms.RandomAffine(10, (0.06, 0.06), (0.9, 1.1)),
                             transforms.ColorJitter(0.2, 0.2), transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(cfg["mean"], cfg["std"])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model.train()
    n, wait, t0 = 0, 0.0, time.perf_counter()
    it = iter(loader)
    while True:
        tw = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - tw
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    s = time.perf_counter() - t0
    return {"images": n, "seconds": round(s, 2), "images_per_s": round(n / s, 3),
            "data_wait_share": round(wait / s, 3)}


def covidcxr_epoch(manifest: Path, images: int, out: Path, workers: int) -> dict:
    from covidcxr.training import load_config
    from covidcxr.training.loop import fit

    cfg = load_config(REPO / "configs" / "quick.yaml",
                      ["train.epochs=1", f"train.samples_per_epoch={images}", "train.progress=false", "ensemble.seeds=[]",
                       "data.val_max_images=20", f"data.manifest={manifest}", f"train.num_workers={workers}"])
    t0 = time.perf_counter()
    fit(cfg, out, write_card=False)
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"images": m["train_images"], "seconds": round(m["train_seconds"], 2),
            "images_per_s": round(m["images_per_s"], 3), "whole_run_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    import numpy as np
    import torch

    from covidcxr import paths
    from covidcxr.data.manifest import Manifest
    from covidcxr.data.splits import assign_splits

    torch.set_num_threads(os.cpu_count())
    m = assign_splits(Manifest.read(paths.data_root() / "manifest.csv"), val=0.15, test=0.15, seed=0)
    train = m.subset("train")
    keep = np.zeros(len(train), dtype=bool)
    keep[np.linspace(0, len(train) - 1, a.images).astype(int)] = True  # every source and label
    sub = train.subset(mask=keep)
    val = m.subset("val")
    both = Manifest.concat([sub, val.subset(mask=np.arange(len(val)) < 40)])
    weights = paths.weights_dir() / "efficientnet_lite0_imagenet_timm.pth"
    runs = {"plain_loop": [], "covidcxr_train": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = both.write(tmp / "manifest.csv")
        folder = tmp / "imagefolder"
        for i, (p, label) in enumerate(zip(sub.image_paths(), sub.table["label"])):
            (folder / ("covid" if label == "covid" else "non-covid")).mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.abspath(p), folder / ("covid" if label == "covid" else "non-covid") / f"{i}_{Path(p).name}")
        os.environ[paths.CACHE_DIR_ENV] = str(tmp / "cache")
        for r in range(a.rounds):
            runs["plain_loop"].append(plain_epoch(folder, weights, a.workers))
            runs["covidcxr_train"].append(covidcxr_epoch(manifest, a.images, tmp / f"run{r}", a.workers))
    later = {k: v[1:] or v for k, v in runs.items()}
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in later.items()}
    result = {"benchmark": "train_vs_plain", "images_per_epoch": a.images, "rounds": a.rounds, "workers": a.workers,
              "threads": torch.get_num_threads(), "model": "tf_efficientnet_lite0", "image_size": 160, "batch": 16,
              "runs": runs, "median_images_per_s_after_round_1": med,
              "ratio_covidcxr_over_plain": round(med["covidcxr_train"] / med["plain_loop"], 3),
              "peak_rss_mb_process": round(_vmhwm_mb(), 1), "cuda_available": torch.cuda.is_available(),
              "gpu": "none available: GPU-busy share not measured", "load_average_before": load_before,
              "load_average_after": os.getloadavg(),
              "machine_note": "alternating rounds in one run; a load average above the core count means other jobs shared the cores"}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
