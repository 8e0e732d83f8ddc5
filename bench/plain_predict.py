"""The plain baseline for ``covidcxr predict``: a DeepCovid-style PIL + torchvision script, same weights and input size.

    .venv/bin/python bench/plain_predict.py RUN_DIR FILE_LIST OUT_CSV [--batch-size 16] [--workers 0]

What a researcher would write: ``PIL.Image.open(...).convert("L")``, ``transforms.Resize((S, S))``,
``ToTensor``, ``Normalize`` with the run's mean / std (grey repeated to the model's channels), a
DataLoader and an ``inference_mode`` eval loop, on an NCHW model as timm creates it
(``--channels-last``: NHWC, as a tuned script would). No intensity standardisation, no hashing, no
journal, no plausibility checks, no resume: the work covidcxr does on top is what the comparison in
``bench/inference_baselines.py`` prices. The model and its weights come from the run directory
(``load_run``), so both sides run the same network.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class Files(Dataset):
    def __init__(self, files: list[str], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("L")), i


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("file_list")
    ap.add_argument("out_csv")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--channels-last", action="store_true",
                    help="NHWC model and inputs (a tuned script); default NCHW, as timm / torchvision create models")
    a = ap.parse_args(argv)
    from covidcxr.models.run import load_run

    run = load_run(a.run_dir)  # the same weights as covidcxr predict (SHA-256 checked)
    spec, model = run.spec, run.model.eval()
    # load_run keeps models channels-last (covidcxr's own choice); a plain script's model is NCHW.
    model = model.to(memory_format=torch.channels_last if a.channels_last else torch.contiguous_format)
    channels = spec.channels
    transform = transforms.Compose([
        transforms.Resize((spec.image_size, spec.image_size)),
        transforms.ToTensor(),
        transforms.Lambda(lambda x: x.expand(channels, -1, -1)),
        transforms.Normalize(spec.mean, spec.std),
    ])
    files = Path(a.file_list).read_text().split("\n")
    files = [f for f in files if f]
    loader = DataLoader(Files(files, transform), batch_size=a.batch_size, num_workers=a.workers)
    rows = []
    with torch.inference_mode():
        for x, idx in loader:
            if a.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probs = model(x).softmax(dim=1).numpy()
            rows.extend((files[i], *p) for i, p in zip(idx.tolist(), probs))
    with open(a.out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *[f"prob_{c}" for c in run.classes]])
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
