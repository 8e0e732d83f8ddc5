"""How real do generated X-rays look, measured offline: FID / KID on ImageNet features, pHash copy check.

Features: the global-pooled 1,280-d penultimate layer of the offline ImageNet EfficientNet-Lite0
(``efficientnet_lite0_imagenet_timm.pth`` of the shared weights, SHA-256 checked). Inception-v3, the
network FID was defined with, is not available offline, so these numbers are *not* comparable with
published FIDs; they are comparable with each other, which is why every report carries baselines
computed the same way at the same sample size:

* ``generated``: generated images vs real held-out images of the target domain (the reference);
* ``real_vs_real``: other real images of the target domain vs the same reference (the floor: what
  two samples of real images score at this n);
* ``untranslated``: the source images before translation vs the reference (the ceiling: doing nothing).

A translation that works moves ``generated`` from the ``untranslated`` value toward ``real_vs_real``.

Every image is first brought to the generator's resolution (stretched to ``size`` x ``size``), then to
224 px, so that real and generated images differ in content, not in resolution.

* FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)``, the matrix square root with
  :func:`scipy.linalg.sqrtm` (with the usual small diagonal offset when the product is singular, as in
  pytorch-fid). Biased upward at small n, hence the same-n baselines.
* KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
  ``(x.y / d + 1)^3``, mean and standard deviation over random subsets.
* Copies: the 256-bit pHash (:mod:`covidcxr.data.audit.duplicates`) of every generated image against
  every GAN training image; the nearest Hamming distance and the share within the near-duplicate
  threshold (24 bits). The same numbers for the real reference images are the data's own baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from covidcxr.errors import CovidCXRError

FEATURE_FILE = "efficientnet_lite0_imagenet_timm.pth"
FEATURE_SHA256 = "711997994847d2d492117ee702a3aa7f2e37bc1898d00ffe67e7288f16274ac1"
FEATURE_SIZE = 224


def feature_network(weights: str | Path | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` without its head (global-pooled features), from the shared weights."""
    import timm

    from covidcxr.models.weights import read_state_dict
    from covidcxr.paths import weights_dir

    path = Path(weights) if weights else weights_dir() / FEATURE_FILE
    state = read_state_dict(path, FEATURE_SHA256)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or any(not k.startswith("classifier.") for k in unexpected):
        raise CovidCXRError(f"{path}: does not fit tf_efficientnet_lite0 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def _load(path: str | Path, size: int) -> np.ndarray:
    from covidcxr.data.io import read_xray

    pixels = read_xray(path, checks=None).pixels  # measuring images, not gating inputs: small ones count
    interp = cv2.INTER_AREA if max(pixels.shape) > size else cv2.INTER_LINEAR
    small = cv2.resize(pixels, (size, size), interpolation=interp)
    return cv2.resize(small, (FEATURE_SIZE, FEATURE_SIZE), interpolation=cv2.INTER_LINEAR)


@torch.no_grad()
def image_features(paths: Sequence[str | Path], network: torch.nn.Module, size: int, batch_size: int = 16) -> np.ndarray:
    """N x 1280 float64 features of the images (grey repeated to RGB, the network's mean = std = 0.5)."""
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.from_numpy(np.stack([_load(p, size) for p in paths[i:i + batch_size]])).float()
        x = ((x - 0.5) / 0.5).unsqueeze(1).expand(-1, 3, -1, -1)
        out.append(network(x).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, network.num_features))


def frechet_distance(f1: np.ndarray, f2: np.ndarray, eps: float = 1e-6) -> float:
    """FID between two feature samples (rows are images)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    import warnings

    with warnings.catch_warnings():  # n < feature dimensions makes both covariances singular: expected here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 50, subset_size: int | None = None,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``subset_size`` images from each sample)."""
    rng = np.random.default_rng(seed)
    m = min(len(f1), len(f2), subset_size or 100)
    if m < 2:
        return float("nan"), float("nan")
    d = f1.shape[1]
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                      - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def nearest_hash_distances(query: Sequence[str | Path], pool: Sequence[str | Path]) -> np.ndarray:
    """For every ``query`` image the smallest pHash Hamming distance (bits of 256) to any ``pool`` image."""
    from covidcxr.data.audit.duplicates import perceptual_hashes

    hq = np.stack([_unchecked_phash(p) for p in query]) if len(query) else np.zeros((0, 32), np.uint8)
    okq = np.ones(len(hq), dtype=bool)
    hp, okp, _ = perceptual_hashes(list(pool), progress=False)
    if not okp.any():
        raise CovidCXRError("none of the training images could be hashed")
    wq, wp = np.ascontiguousarray(hq).view(np.uint64), np.ascontiguousarray(hp[okp]).view(np.uint64)
    dist = np.bitwise_count(wq[:, None, :] ^ wp[None, :, :]).sum(axis=2).min(axis=1).astype(float)
    dist[~okq] = np.nan
    return dist


def _unchecked_phash(path: str | Path) -> np.ndarray:
    """The audit's 256-bit pHash of a decoded image, without the input gate: a generated image that looks
    like noise (an early generator) is still compared, where the audit would call it unreadable."""
    import imagehash
    from PIL import Image

    from covidcxr.data.audit.duplicates import HASH_SIZE
    from covidcxr.data.io import read_xray

    pixels = read_xray(path, checks=None).pixels
    h = imagehash.phash(Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L"), hash_size=HASH_SIZE)
    return np.packbits(h.hash.flatten())


def _copy_summary(dist: np.ndarray, threshold: int) -> dict:
    d = dist[np.isfinite(dist)]
    return {"n": int(len(d)), "unhashable": int((~np.isfinite(dist)).sum()), "min": float(d.min()) if len(d) else None, "median": float(np.median(d)) if len(d) else None,
            "share_within_threshold": float((d <= threshold).mean()) if len(d) else None}


def realism_report(generated: Sequence[Path], reference: Sequence[Path], real_baseline: Sequence[Path],
                   untranslated: Sequence[Path], training: Sequence[Path], *, size: int, weights=None,
                   kid_subsets: int = 50, seed: int = 0) -> dict:
    """FID / KID of generated, real-vs-real and untranslated images against ``reference``; pHash copy check."""
    from covidcxr.data.audit.duplicates import DEFAULT_MAX_DISTANCE

    net = feature_network(weights)
    feats = {name: image_features(list(p), net, size) for name, p in
             (("reference", reference), ("generated", generated), ("real_vs_real", real_baseline),
              ("untranslated", untranslated))}
    scores = {}
    for name in ("generated", "real_vs_real", "untranslated"):
        kid, kid_std = kernel_inception_distance(feats[name], feats["reference"], kid_subsets, seed=seed)
        scores[name] = {"n": int(len(feats[name])), "fid": frechet_distance(feats[name], feats["reference"]),
                        "kid": kid, "kid_std": kid_std}
    copies = {"threshold_bits": DEFAULT_MAX_DISTANCE,
              "generated_to_training": _copy_summary(nearest_hash_distances(generated, training), DEFAULT_MAX_DISTANCE),
              "reference_to_training": _copy_summary(nearest_hash_distances(reference, training), DEFAULT_MAX_DISTANCE)}
    return {"features": f"timm tf_efficientnet_lite0 global pool ({FEATURE_FILE}, sha256 {FEATURE_SHA256[:12]}...), "
                        f"images at {size} px then {FEATURE_SIZE} px",
            "n_reference": int(len(feats["reference"])), "scores": scores, "copies": copies,
            "note": "FID/KID on EfficientNet-Lite0 features, not Inception-v3: compare within this report only"}
