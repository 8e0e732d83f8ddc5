"""Batch samplers: plain shuffling, class-balanced and source-balanced batches.

Every sampler here is a *batch* sampler that yields lists of ``(row, seed)`` pairs: ``row`` indexes
the dataset, ``seed`` drives that sample's augmentation. Both depend only on ``(seed, epoch)``, so a
run is reproducible whatever the number of DataLoader workers, and a resumed run draws exactly the
batches the uninterrupted run would have drawn.

Source-balanced sampling (``sampler: source_balanced``) works on cells = (source, class):

1. every source is drawn equally often (weight 1 each), whatever its size;
2. inside a source, each class the source holds gets an equal share of that source's draws, so
   within a source the label cannot be predicted from how often the source appears;
3. a source that holds only ONE class (in the shared data: NIH, Kermany and RSNA hold no COVID
   image) gets weight ``single_class_source_weight`` instead of 1 (default 1.0; 0 drops such sources
   from training, which removes the pure "which collection" signal at the cost of data);
4. inside a cell, images are drawn without replacement in a fresh random order, and the cell is
   reshuffled when exhausted (small cells are repeated, large cells are covered over epochs).

Each batch gets its cell counts by largest-remainder rounding of ``batch_size x cell probability``
(ties broken at random), so every batch - not only the epoch on average - holds the cells in
proportion. Overall class balance is NOT forced (with 2 mixed and 3 one-class sources COVID is
1/5 of the draws in the shared data); combine with ``loss_weighting: class_weighted`` for that.

``balanced`` uses the same machinery with cells = classes, each class drawn equally often.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pandas as pd

_SEED_MAX = 2**31 - 1


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """The generator for ``(seed, epoch, stream)``: independent of everything that ran before."""
    return np.random.default_rng([int(seed), int(epoch), int(stream)])


def source_balanced_cell_weights(labels: Sequence, sources: Sequence,
                                 single_class_source_weight: float = 1.0) -> dict[tuple, float]:
    """Probability of each (source, label) cell under source-balanced sampling (rules 1-3 above)."""
    df = pd.DataFrame({"source": list(sources), "label": list(labels)})
    weights: dict[tuple, float] = {}
    for source, group in df.groupby("source", sort=True):
        classes = sorted(group["label"].unique())
        w_source = 1.0 if len(classes) > 1 else single_class_source_weight
        for c in classes:
            weights[(source, c)] = w_source / len(classes)
    total = sum(weights.values())
    if total <= 0:
        from covidcxr.errors import ConfigError

        raise ConfigError("config key train.single_class_source_weight: source-balanced sampling has no source left "
                          "with a positive weight (it is 0 and no training source holds two classes); "
                          "set it above 0 or use another train.sampler")
    return {k: v / total for k, v in weights.items()}


def class_balanced_cell_weights(labels: Sequence) -> dict[tuple, float]:
    classes = sorted(set(labels))
    return {(c,): 1.0 / len(classes) for c in classes}


class StratifiedBatchSampler:
    """Batches whose composition over cells follows fixed probabilities (see module docstring)."""

    def __init__(self, cells: Sequence[tuple], cell_weights: dict[tuple, float], batch_size: int,
                 num_batches: int, seed: int = 0):
        self.batch_size = int(batch_size)
        self.num_batches = int(num_batches)
        self.seed = int(seed)
        self.epoch = 0
        members: dict[tuple, list[int]] = {}
        for i, cell in enumerate(cells):
            members.setdefault(tuple(cell), []).append(i)
        self.cells = [c for c in sorted(cell_weights, key=str) if cell_weights[c] > 0]
        missing = [c for c in self.cells if c not in members]
        if missing:
            raise ValueError(f"cells without rows: {missing}")
        self.members = [np.asarray(members[c]) for c in self.cells]
        p = np.asarray([cell_weights[c] for c in self.cells], dtype=np.float64)
        self.probs = p / p.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def _counts(self, rng: np.random.Generator) -> np.ndarray:
        exact = self.batch_size * self.probs
        counts = np.floor(exact).astype(int)
        rest = self.batch_size - counts.sum()
        if rest:
            frac = exact - counts
            # Largest remainder, ties (and near-ties) broken at random.
            order = np.lexsort((rng.random(len(frac)), -np.round(frac, 9)))
            counts[order[:rest]] += 1
        return counts

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = epoch_rng(self.seed, self.epoch, stream=1)
        queues = [rng.permutation(m) for m in self.members]
        pos = [0] * len(queues)
        for _ in range(self.num_batches):
            batch = []
            for k, n in enumerate(self._counts(rng)):
                for _ in range(n):
                    if pos[k] >= len(queues[k]):
                        queues[k], pos[k] = rng.permutation(self.members[k]), 0
                    batch.append(int(queues[k][pos[k]]))
                    pos[k] += 1
            rng.shuffle(batch)
            yield [(row, int(rng.integers(_SEED_MAX))) for row in batch]


class ShuffleBatchSampler:
    """Plain shuffling (optionally a random subset of ``num_samples`` rows per epoch)."""

    def __init__(self, n_rows: int, batch_size: int, num_samples: int | None = None, seed: int = 0):
        self.n_rows, self.batch_size, self.seed, self.epoch = int(n_rows), int(batch_size), int(seed), 0
        self.num_samples = min(int(num_samples), self.n_rows) if num_samples else self.n_rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(1, self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rng = epoch_rng(self.seed, self.epoch, stream=1)
        order = rng.permutation(self.n_rows)[: len(self) * self.batch_size]
        for b in range(len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(int(r), int(rng.integers(_SEED_MAX))) for r in rows]


def make_batch_sampler(kind: str, labels: Sequence, sources: Sequence, batch_size: int,
                       samples_per_epoch: int | None, seed: int, single_class_source_weight: float = 1.0):
    """The batch sampler named by ``train.sampler`` (none | balanced | source_balanced)."""
    n = len(labels)
    num_batches = max(1, (samples_per_epoch or n) // batch_size)
    if kind == "none":
        return ShuffleBatchSampler(n, batch_size, samples_per_epoch, seed)
    if kind == "balanced":
        return StratifiedBatchSampler([(y,) for y in labels], class_balanced_cell_weights(labels),
                                      batch_size, num_batches, seed)
    if kind == "source_balanced":
        weights = source_balanced_cell_weights(labels, sources, single_class_source_weight)
        return StratifiedBatchSampler(list(zip(sources, labels)), weights, batch_size, num_batches, seed)
    raise ValueError(f"unknown sampler {kind!r}")
