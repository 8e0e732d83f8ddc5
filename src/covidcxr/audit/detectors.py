"""Backdoor detectors on a model's penultimate features: activation clustering, spectral signatures, STRIP.

* **Activation clustering** (Chen et al. 2018) and **spectral signatures** (Tran et al. 2018) come
  from the Adversarial Robustness Toolbox (``ActivationDefence``, ``SpectralSignatureDefense``).
  ART asks for a classifier and computes activations itself; covidcxr already has the penultimate
  features from its one prediction path (:func:`covidcxr.evaluation.proxies.predict_files`), so ART
  gets them through an identity "classifier" whose only layer is those features. ART's clustering
  marks the smaller of two clusters in *every* class as poison; a clean class splits too (by source,
  say), so each class also gets the silhouette of its two clusters (Chen et al.'s own criterion for
  a real split) and only classes at or above ``silhouette`` count (:func:`activation_clustering`).
  2-means draws a hard border, and poisoned images that the trigger moved only part of the way sit
  just on the clean side of it (7 of 29 in a lung-placed attack). So in a suspicious class every image
  is scored by where it falls on the axis from the larger cluster's centre (0) to the smaller one's
  (1), and the top ``margin`` x the smaller cluster's size are flagged: Tran et al.'s margin of 1.5,
  which spectral signatures use too, trading a few clean images for the poisoned ones the border missed.
* **STRIP** (Gao et al. 2019) is written here: ART's ``STRIPMixin`` exposes no per-image entropy,
  sets its threshold from a normal fit rather than the clean images' quantile, and sums the entropy
  over the overlays instead of over the classes, so false acceptance at a chosen false rejection
  cannot be read from it. :func:`strip_entropy` superimposes each input with clean images (equal
  weights, on the preprocessed tensors) and averages the class entropy of the predictions; a
  backdoored input keeps its forced class whatever is blended in, so its entropy is low.
"""

from __future__ import annotations

import numpy as np
import torch

#: ART's default: a cluster holding less than this share of its class is "smaller" (poison).
ART_SIZE_THRESHOLD = 0.35
#: Tran et al.'s (and ART's spectral-signature) margin: flag 1.5 x the estimated number of poisoned images.
FLAG_MARGIN = 1.5


def _identity_classifier(dim: int, nb_classes: int):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=torch.nn.Sequential(torch.nn.Identity()), loss=torch.nn.CrossEntropyLoss(),
                             input_shape=(dim,), nb_classes=nb_classes)


def activation_clustering(features: np.ndarray, labels: np.ndarray, nb_classes: int, *, silhouette: float,
                          max_share: float = ART_SIZE_THRESHOLD, margin: float = FLAG_MARGIN, nb_dims: int = 10,
                          seed: int = 0) -> dict:
    """ART activation clustering (2-means on PCA-``nb_dims`` of each class). Returns per image
    ``flagged_art`` (ART's own verdict: the smaller cluster of every class), ``in_smaller_cluster``
    (the same, only in *suspicious* classes: silhouette >= ``silhouette`` and smaller cluster <=
    ``max_share`` of the class), ``score`` (position on the axis between the class's two cluster
    centres, larger 0, smaller 1) and ``flagged`` (in suspicious classes, the top ``margin`` x the
    smaller cluster's size by ``score``); per class, the smaller cluster's share, the silhouette and
    whether it is suspicious."""
    from art.defences.detector.poison import ActivationDefence
    from sklearn.metrics import silhouette_score

    from covidcxr.errors import CovidCXRError

    counts = np.bincount(labels, minlength=nb_classes)
    if counts.min() < 4:
        raise CovidCXRError(f"activation clustering needs at least 4 images of every class, got {counts.tolist()}")
    np.random.seed(seed)  # ART's MiniBatchKMeans takes no seed of its own
    x = np.asarray(features, dtype=np.float32)
    defence = ActivationDefence(_identity_classifier(x.shape[1], nb_classes), x, np.eye(nb_classes)[labels])
    # PCA per class cannot keep more dimensions than the smallest class has images
    _, is_clean = defence.detect_poison(nb_clusters=2, nb_dims=int(min(nb_dims, x.shape[1], counts.min() - 1)),
                                        reduce="PCA", cluster_analysis="smaller")
    flagged_art = np.asarray(is_clean) == 0
    in_smaller, flagged = np.zeros(len(x), dtype=bool), np.zeros(len(x), dtype=bool)
    score = np.zeros(len(x))
    classes = []
    for c, (clusters, reduced) in enumerate(zip(defence.clusters_by_class, defence.red_activations_by_class)):
        idx = np.flatnonzero(labels == c)
        sizes = np.bincount(np.asarray(clusters, dtype=int), minlength=2)
        sil = float(silhouette_score(reduced, clusters)) if len(idx) > 2 and (sizes > 0).all() else None
        share = float(sizes.min() / max(1, sizes.sum()))
        if (sizes > 0).all():
            smaller = np.asarray(clusters) == np.argmin(sizes)
            score[idx] = _axis_position(np.asarray(reduced, dtype=np.float64), smaller)
        # The flags and the verdict use one rule: a class with a real split whose smaller side is small.
        suspicious = sil is not None and sil >= silhouette and share <= max_share
        if suspicious:
            in_smaller[idx] = flagged_art[idx]
            top = np.argsort(-score[idx], kind="stable")[:min(len(idx), round(margin * sizes.min()))]
            flagged[idx[top]] = True
        classes.append({"class_index": c, "images": int(len(idx)), "smaller_share": share,
                        "silhouette": sil, "suspicious": bool(suspicious)})
    return {"flagged_art": flagged_art, "in_smaller_cluster": in_smaller, "flagged": flagged, "score": score,
            "classes": classes}


def _axis_position(points: np.ndarray, smaller: np.ndarray) -> np.ndarray:
    """Each point's projection on the line from the larger cluster's centre (0) to the smaller one's (1)."""
    start, axis = points[~smaller].mean(axis=0), points[smaller].mean(axis=0) - points[~smaller].mean(axis=0)
    return (points - start) @ axis / max(float(axis @ axis), 1e-12)


def spectral_signatures(features: np.ndarray, labels: np.ndarray, nb_classes: int, *, expected_fraction: float,
                        eps_multiplier: float = FLAG_MARGIN) -> dict:
    """ART's spectral signature score (squared projection on the top singular vector of the class-centred
    features) per image; within each class the top ``eps_multiplier x expected_fraction`` are flagged,
    as ``SpectralSignatureDefense`` does. Also returns, per class, the top score over the median (a
    class without a poisoned sub-population has no strong outlier direction)."""
    from art.defences.detector.poison import SpectralSignatureDefense

    x = np.asarray(features, dtype=np.float64)
    scores = np.zeros(len(x))
    flagged = np.zeros(len(x), dtype=bool)
    classes = []
    for c in range(nb_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 3:
            continue
        s = SpectralSignatureDefense.spectral_signature_scores(x[idx]).ravel()
        scores[idx] = s
        cut = np.quantile(s, max(1 - eps_multiplier * expected_fraction, 0.0))
        flagged[idx] = s >= cut
        classes.append({"class_index": c, "images": int(len(idx)),
                        "p99_over_median": float(np.quantile(s, 0.99) / max(np.median(s), 1e-12))})
    return {"scores": scores, "flagged": flagged, "classes": classes}


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> dict:
    """Precision and recall of ``flagged`` for the truly poisoned images ``truth``."""
    flagged, truth = np.asarray(flagged, bool), np.asarray(truth, bool)
    tp = int((flagged & truth).sum())
    return {"flagged": int(flagged.sum()), "poisoned": int(truth.sum()), "true_positives": tp,
            "precision": tp / flagged.sum() if flagged.any() else None,
            "recall": tp / truth.sum() if truth.any() else None}


@torch.no_grad()
def blend_predictions(run, inputs: torch.Tensor, pool: torch.Tensor, *, overlays: int = 16, seed: int = 0,
                      weight: float = 0.5, batch_size: int = 64) -> np.ndarray:
    """N x ``overlays`` x K class probabilities of the run on each input blended with ``overlays`` random
    images of ``pool`` (preprocessed N x C x S x S tensors): ``(1 - weight) x input + weight x overlay``."""
    rng = np.random.default_rng([seed, 2019])
    out = []
    for x in inputs:
        picked = pool[rng.choice(len(pool), overlays, replace=len(pool) < overlays)]
        blends = (1 - weight) * x.unsqueeze(0) + weight * picked
        out.append(np.concatenate([run.predict_tensor(blends[j:j + batch_size])
                                   for j in range(0, len(blends), batch_size)]))
    return np.stack(out) if out else np.zeros((0, overlays, 0), dtype=np.float32)


def strip_entropy(run, inputs: torch.Tensor, pool: torch.Tensor, *, overlays: int = 16, seed: int = 0,
                  batch_size: int = 64) -> np.ndarray:
    """Mean class entropy (bits) of the run's predictions on each input blended 50/50 with ``overlays``
    random images of ``pool`` (preprocessed N x C x S x S tensors)."""
    p = blend_predictions(run, inputs, pool, overlays=overlays, seed=seed, batch_size=batch_size)
    return (-(p * np.log2(np.clip(p, 1e-12, 1))).sum(axis=2)).mean(axis=1).astype(np.float64)


def far_at_frr(clean: np.ndarray, triggered: np.ndarray, frr: float = 0.01) -> dict:
    """STRIP's operating point: the entropy threshold that rejects ``frr`` of the clean inputs, and the
    share of triggered inputs that pass it (false acceptance)."""
    threshold = float(np.quantile(clean, frr))
    return {"frr_target": frr, "threshold_bits": threshold, "frr": float((clean <= threshold).mean()),
            "far": float((triggered > threshold).mean()), "clean": int(len(clean)), "triggered": int(len(triggered))}
