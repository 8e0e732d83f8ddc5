"""Shortcut scorecards of the main job's model and of a model trained on the shortcut on purpose (issue 11).

    .venv/bin/python bench/shortcut_cards.py [--run runs/quick] [--manifest runs/data/split.csv]
                                             [--limit-per-source 20] [--work /tmp/covidcxr_shortcut_cards]

The shortcut model is ``configs/quick.yaml`` on whole images (``preprocess.roi=full``, no intensity
standardisation, plain cross-entropy) trained on the same training rows with a *source* label: every
image of a collection that holds COVID-19 images (ieee8023, Figure1) is labelled covid, every other
image non-covid. It can only learn which collection an image came from. Both models are then audited with
``covidcxr audit shortcuts`` on the same seeded sample of the main job's test rows, against their
true labels. The card should pass / warn on the first and fail on the second.

Writes ``bench/results/shortcut_cards.json`` (both cards, the wall time of each audit and the training
cost of the shortcut model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("COVIDCXR_DATA_ROOT", str(REPO.parent / "shared" / "data" / "cxr"))
os.environ.setdefault("COVIDCXR_WEIGHTS_DIR", str(REPO.parent / "shared" / "weights"))
RESULTS = REPO / "bench" / "results" / "shortcut_cards.json"


def source_labelled(manifest_path: Path, out: Path) -> tuple[Path, list[str]]:
    """The manifest with ``label`` replaced by "does this image's collection hold COVID images"."""
    from covidcxr.data.manifest import Manifest

    m = Manifest.read(manifest_path)
    t = m.table.copy()
    covid_sources = sorted(t.loc[t["label"] == "covid", "source"].astype(str).unique())
    t["label"] = t["source"].astype(str).isin(covid_sources).map({True: "covid", False: "normal"})
    m.replace(t).write(out)  # write() re-roots the image paths at the new file's folder
    return out, covid_sources


def card_summary(card: dict) -> dict:
    return {"verdict": card["verdict"], "sentence": card["sentence"], "images": card["images"],
            "seconds": card["seconds"], "checks": [{k: c.get(k) for k in ("name", "value", "ci_low", "ci_high",
                                                                           "verdict", "sentence", "detail")}
                                                    for c in card["checks"]]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "quick")
    ap.add_argument("--manifest", type=Path, default=REPO / "runs" / "data" / "split.csv")
    ap.add_argument("--limit-per-source", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path("/tmp/covidcxr_shortcut_cards"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)

    from covidcxr.audit.scorecard import audit_shortcuts
    from covidcxr.files import jsonable, write_json
    from covidcxr.training import load_config
    from covidcxr.training.loop import fit

    a.work.mkdir(parents=True, exist_ok=True)
    labelled, covid_sources = source_labelled(a.manifest, a.work / "split_source_label.csv")
    shortcut_run = a.work / "source_detector"
    t0 = time.perf_counter()
    if not (shortcut_run / "run.json").is_file():
        cfg = load_config(REPO / "configs" / "quick.yaml", [
            # intensity pinned: quick.yaml's hist_eq (since 2026-12-08) would change the detector of the earlier cards
            "preprocess.roi=full", "preprocess.intensity=none", "train.objective=ce", "train.sampler=none",
            "train.progress=false", "ensemble.seeds=[]",
            f"data.manifest={labelled}"])
        fit(cfg, shortcut_run, write_card=False)
    train_s = time.perf_counter() - t0
    cards = {}
    for name, run in (("main_job_model", a.run), ("source_detector", shortcut_run)):
        print(f"auditing {name} ({run})", flush=True)
        card = audit_shortcuts(run, a.manifest, split="test", limit_per_source=a.limit_per_source,
                               out=a.work / f"audit_{name}", write_record=False)
        cards[name] = card_summary(card)
        print(f"{name}: {card['verdict']}: {card['sentence']} ({card['seconds']} s)", flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"benchmark": "shortcut_cards", "manifest": str(a.manifest), "split": "test",
              "limit_per_source": a.limit_per_source,
              "shortcut_model": {"what": "quick.yaml, roi=full, intensity=none, plain CE, shuffled batches, trained on a source label: "
                                         f"covid = an image of {covid_sources}", "train_wall_s": round(train_s, 1),
                                 "run": str(shortcut_run)},
              "cards": cards, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_average": os.getloadavg()}
    write_json(a.out, jsonable(result))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
