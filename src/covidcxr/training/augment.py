"""Chest X-ray augmentation (torchvision.transforms.v2) and batch mixing (mixup / cutmix).

Augmentation runs on the prepared 1 x S x S image in [0, 1] (after intensity standardisation and
resizing, before normalisation), so it is the same for every architecture. Geometry: small
rotation, scale and shift, optional horizontal flip. There is deliberately NO vertical flip: an
upside-down chest X-ray does not occur and would teach the model nothing useful. Intensity:
brightness / contrast, and the "strong" option adds random gamma, Gaussian blur and Gaussian noise,
which blur the per-source contrast, sharpness and noise signatures a model could use as a shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from covidcxr.training.config import AugmentConfig


class RandomGamma(v2.Transform):
    """``x ** gamma`` with gamma drawn log-uniformly from ``gamma_range`` (image in [0, 1])."""

    def __init__(self, gamma_range: tuple[float, float]):
        super().__init__()
        self.low, self.high = float(gamma_range[0]), float(gamma_range[1])

    def make_params(self, flat_inputs):
        lo, hi = torch.log(torch.tensor(self.low)), torch.log(torch.tensor(self.high))
        return {"gamma": float(torch.exp(lo + (hi - lo) * torch.rand(()))) }

    def transform(self, inpt, params):
        return v2.functional.adjust_gamma(inpt.clamp(0, 1), params["gamma"])


def build_augmentation(cfg: AugmentConfig) -> v2.Transform | None:
    """The per-image training transform described by ``cfg`` (None when disabled)."""
    if not cfg.enabled:
        return None
    steps: list[v2.Transform] = [
        v2.RandomAffine(degrees=cfg.rotation_deg, translate=(cfg.translate, cfg.translate), scale=tuple(cfg.scale),
                        interpolation=v2.InterpolationMode.BILINEAR, fill=0.0),
    ]
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(p=cfg.hflip_p))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None))
    if cfg.strong_intensity:
        steps.append(RandomGamma(cfg.gamma))
        if cfg.blur_p > 0:
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=tuple(cfg.blur_sigma))], p=cfg.blur_p))
        if cfg.noise_p > 0 and cfg.noise_std > 0:
            steps.append(v2.RandomApply([v2.GaussianNoise(mean=0.0, sigma=cfg.noise_std, clip=True)], p=cfg.noise_p))
    steps.append(v2.Lambda(lambda x: x.clamp(0.0, 1.0)))
    return v2.Compose(steps)


def apply_seeded(transform: v2.Transform, image: torch.Tensor, seed: int) -> torch.Tensor:
    """Run ``transform`` with its randomness fixed by ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return transform(image)


class BatchMixer:
    """Mixup and/or cutmix on a batch (torchvision v2), returning soft targets.

    With both alphas > 0 each mixed batch uses one of the two at random. A batch is mixed with
    probability ``p``; otherwise its targets are plain one-hot vectors. Randomness comes from the
    global torch RNG, which the training loop seeds per epoch.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, p: float = 1.0):
        self.num_classes, self.p = int(num_classes), float(p)
        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.op = None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @property
    def active(self) -> bool:
        return self.op is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.op is not None and float(torch.rand(())) < self.p:
            return self.op(images, targets)
        return images, F.one_hot(targets, self.num_classes).to(images.dtype)

    @classmethod
    def from_config(cls, cfg: AugmentConfig, num_classes: int) -> "BatchMixer":
        return cls(num_classes, cfg.mixup_alpha if cfg.enabled else 0.0, cfg.cutmix_alpha if cfg.enabled else 0.0,
                   cfg.mix_p)
