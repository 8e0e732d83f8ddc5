"""Backdoor detectors on a model's penultimate features: activation clustering, spectral signatures, STRIP.

* **Activation clustering** (Chen et al. 2018) and **spectral signatures** (Tran et al. 2018) come
  from the Adversarial Robustness Toolbox (``ActivationDefence``, ``SpectralSignatureDefense``).
  ART asks for a classifier and computes activations itself; covidcxr already has the penultimate
  features from its one prediction path (:func:`covidcxr.evaluation.proxies.predict_files`), so ART
  gets them through an identity "classifier" whose only layer is those features. ART's clustering
  marks the smaller of two clusters in *every* class as poison; a clean class splits too (by source,
  say), so each class also gets the silhouette of its two clusters (Chen et al.'s own criterion for
  a real split) and only classes at or above ``silhouette`` count (:func:`activation_clustering`).
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


def _identity_classifier(dim: int, nb_classes: int):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=torch.nn.Sequential(torch.nn.Identity()), loss=torch.nn.CrossEntropyLoss(),
                             input_shape=(dim,), nb_classes=nb_classes)


def activation_clustering(features: np.ndarray, labels: np.ndarray, nb_classes: int, *, silhouette: float,
                          max_share: float = ART_SIZE_THRESHOLD, nb_dims: int = 10, seed: int = 0) -> dict:
    """ART activation clustering (2-means on PCA-``nb_dims`` of each class); returns ``flagged_art``
    (ART's own verdict per image), ``flagged`` (ART's verdict only in *suspicious* classes: silhouette
    >= ``silhouette`` and smaller cluster <= ``max_share`` of the class) and, per class, the smaller
    cluster's share, the silhouette and whether it is suspicious."""
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
    flagged = np.zeros(len(x), dtype=bool)
    classes = []
    for c, (clusters, reduced) in enumerate(zip(defence.clusters_by_class, defence.red_activations_by_class)):
        idx = np.flatnonzero(labels == c)
        sizes = np.bincount(np.asarray(clusters, dtype=int), minlength=2)
        sil = float(silhouette_score(reduced, clusters)) if len(idx) > 2 and (sizes > 0).all() else None
        share = float(sizes.min() / max(1, sizes.sum()))
        # The flags and the verdict use one rule: a class with a real split whose smaller side is small.
        suspicious = sil is not None and sil >= silhouette and share <= max_share
        if suspicious:
            flagged[idx] = flagged_art[idx]
        classes.append({"class_index": c, "images": int(len(idx)), "smaller_share": share,
                        "silhouette": sil, "suspicious": bool(suspicious)})
    return {"flagged_art": flagged_art, "flagged": flagged, "classes": classes}


def spectral_signatures(features: np.ndarray, labels: np.ndarray, nb_classes: int, *, expected_fraction: float,
                        eps_multiplier: float = 1.5) -> dict:
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
def strip_entropy(run, inputs: torch.Tensor, pool: torch.Tensor, *, overlays: int = 16, seed: int = 0,
                  batch_size: int = 64) -> np.ndarray:
    """Mean class entropy (bits) of the run's predictions on each input blended 50/50 with ``overlays``
    random images of ``pool`` (preprocessed N x C x S x S tensors)."""
    rng = np.random.default_rng([seed, 2019])
    out = np.empty(len(inputs))
    for i, x in enumerate(inputs):
        blends = 0.5 * x.unsqueeze(0) + 0.5 * pool[rng.choice(len(pool), overlays, replace=len(pool) < overlays)]
        p = np.concatenate([run.predict_tensor(blends[j:j + batch_size]) for j in range(0, len(blends), batch_size)])
        out[i] = float(np.mean(-(p * np.log2(np.clip(p, 1e-12, 1))).sum(axis=1)))
    return out


def far_at_frr(clean: np.ndarray, triggered: np.ndarray, frr: float = 0.01) -> dict:
    """STRIP's operating point: the entropy threshold that rejects ``frr`` of the clean inputs, and the
    share of triggered inputs that pass it (false acceptance)."""
    threshold = float(np.quantile(clean, frr))
    return {"frr_target": frr, "threshold_bits": threshold, "frr": float((clean <= threshold).mean()),
            "far": float((triggered > threshold).mean()), "clean": int(len(clean)), "triggered": int(len(triggered))}
