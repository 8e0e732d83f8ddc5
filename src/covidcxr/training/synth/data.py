"""The two image domains of a CycleGAN: manifest rows by filter, their prepared images, seeded jitter.

A domain is every manifest row where each filter ``column: value`` holds (see
:class:`~covidcxr.training.synth.config.DomainConfig`), taken from the ``train_splits`` rows only, so a
patient the classifier is tested on never shapes the generator. Images go through the project's one
pipeline (working-size cache -> intensity -> resize: :mod:`covidcxr.data.preprocess`) and are kept in
memory as S x S uint16. Synthetic rows never train a GAN.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
import cv2
import numpy as np
import pandas as pd

from covidcxr.data.dataset import load_working
from covidcxr.data.manifest import Manifest
from covidcxr.data.preprocess import PreprocessSpec, dequantise, prepare
from covidcxr.data.synthetic import synthetic_mask
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.training.synth.config import DomainConfig, SynthConfig


@dataclass
class Domain:
    """The training images of one domain (prepared S x S uint16) and the manifest rows they came from."""

    name: str
    rows: pd.DataFrame  # image, patient_id, label, source, split of the rows used
    images: np.ndarray  # N x S x S uint16

    def __len__(self) -> int:
        return len(self.images)


def domain_mask(table: pd.DataFrame, domain: DomainConfig, where: str = "manifest") -> np.ndarray:
    """Rows of ``table`` in ``domain`` (every filter column must exist)."""
    keep = np.ones(len(table), dtype=bool)
    for column, values in domain.values().items():
        if column not in table.columns:
            raise ConfigError(f"domain {domain.name}: {where} has no column {column!r} to filter on "
                              f"(columns: {', '.join(map(str, table.columns))})")
        keep &= table[column].astype(str).isin(values).to_numpy()
    return keep


def split_manifest(cfg: SynthConfig) -> Manifest:
    """The config's manifest with a split: the one it has, or a patient-grouped one made with ``split_seed``."""
    manifest = Manifest.read(cfg.manifest)
    if (manifest.table["split"] == "").all():
        if cfg.split_seed is None:
            raise ConfigError(f"{manifest.name}: no split assigned. Run `covidcxr data split` first, or set "
                              "split_seed=N to split here (patient-grouped), so test patients never train the GAN")
        from covidcxr.data.splits import assign_splits

        manifest = assign_splits(manifest, seed=cfg.split_seed)
    return manifest


def select_domain_rows(manifest: Manifest, cfg: SynthConfig, domain: DomainConfig) -> pd.DataFrame:
    """The real (not synthetic) ``train_splits`` rows of ``domain``; at most ``max_images``, seeded."""
    t = manifest.table
    keep = domain_mask(t, domain, manifest.name) & t["split"].isin(cfg.train_splits).to_numpy() & ~synthetic_mask(t)
    sub = manifest.subset(mask=keep)
    if len(sub) < 2:
        raise ConfigError(f"domain {domain.name}: {len(sub)} real image(s) in splits {cfg.train_splits} of "
                          f"{manifest.name} match {domain.values()}; a domain needs at least 2")
    paths = sub.image_paths(check_root=True)  # refused before any file is opened if outside the data root
    idx = np.arange(len(sub))
    if cfg.max_images is not None and len(sub) > cfg.max_images:
        rng = np.random.default_rng([cfg.seed, 11, len(domain.name)])
        idx = np.sort(rng.choice(len(sub), cfg.max_images, replace=False))
    out = sub.table.iloc[idx][["image", "patient_id", "label", "source", "split"]].copy()
    out["path"] = [str(paths[i]) for i in idx]
    return out.reset_index(drop=True)


def load_domain(name: str, rows: pd.DataFrame, spec: PreprocessSpec, progress=None) -> Domain:
    """Read every row's image through the pipeline; an unreadable image stops with its name and reason."""
    images = []
    for path in rows["path"]:
        try:
            images.append(prepare(load_working(path, spec.working_size), spec))
        except CovidCXRError as exc:
            raise CovidCXRError(f"domain {name}: {exc}; remove the row or fix the file") from None
        if progress is not None:
            progress()
    return Domain(name, rows.drop(columns=["path"]), np.stack(images))


def rows_sha256(rows: pd.DataFrame) -> str:
    """SHA-256 over the (image, patient_id) rows a domain trained on, in order."""
    text = "".join(f"{i},{p}\n" for i, p in zip(rows["image"], rows["patient_id"]))
    return hashlib.sha256(text.encode()).hexdigest()


def jittered(image: np.ndarray, rng: np.random.Generator, jitter: float, hflip: bool) -> np.ndarray:
    """The published augmentation: enlarge by ``1 + jitter``, random crop back to S (and optional flip);
    float32 in [0, 1]."""
    x = dequantise(image)
    s = x.shape[0]
    big = int(round(s * (1 + jitter)))
    if big > s:
        x = cv2.resize(x, (big, big), interpolation=cv2.INTER_LINEAR)
        top, left = (int(v) for v in rng.integers(0, big - s + 1, size=2))
        x = x[top:top + s, left:left + s]
    if hflip and rng.random() < 0.5:
        x = x[:, ::-1]
    return np.ascontiguousarray(x, dtype=np.float32)
