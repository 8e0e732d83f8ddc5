"""Chest X-ray augmentation (torchvision.transforms.v2) and batch mixing (mixup / cutmix).

Augmentation runs on the prepared 1 x S x S image in [0, 1] (after intensity standardisation and
resizing, before normalisation), so it is the same for every architecture. Geometry: small
rotation, scale and shift, optional horizontal flip. There is deliberately NO vertical flip: an
upside-down chest X-ray does not occur and would teach the model nothing useful. Intensity:
brightness / contrast, and the "strong" option adds random gamma, Gaussian blur and Gaussian noise,
which blur the per-source contrast, sharpness and noise signatures a model could use as a shortcut.

Storage: ``jpeg_p`` re-compresses the image as a JPEG of random quality (``jpeg_quality``) and
``resolution_p`` shrinks it to a random fraction of its side and enlarges it back (``resolution_scale``),
for every class alike. In the public collections the COVID images are recompressed publication
figures and the negatives mostly clean hospital exports, so compression and resolution are source
signatures; a model that sees both on every class cannot use them to tell the classes apart.
Both run first, before geometry and intensity, because in the data they happened to the file.
"""

from __future__ import annotations

import cv2
import numpy as np
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


def jpeg_roundtrip(image: torch.Tensor, quality: int, scale: float = 1.0) -> torch.Tensor:
    """Encode a 1 x H x W (or H x W) float image in [0, 1] as an 8-bit grey JPEG of ``quality`` and decode it.

    With ``scale`` > 1 the image is enlarged by that factor first (bilinear) and shrunk back after
    decoding (area), i.e. the compression of a larger original seen at this resolution.
    """
    shape = image.shape
    x = image.detach().reshape(shape[-2:]).clamp(0, 1).cpu().numpy().astype(np.float32)
    h, w = x.shape
    if scale > 1.0:
        x = cv2.resize(x, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR)
    x8 = np.round(x * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", x8, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any 8-bit grey image
        raise RuntimeError("JPEG encoding failed")
    y = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / np.float32(255.0)
    if y.shape != (h, w):
        y = cv2.resize(y, (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(y)).reshape(shape).to(image.dtype)


def resolution_roundtrip(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Shrink a ... x H x W image to ``factor`` of its side (area) and enlarge it back (bilinear)."""
    shape = image.shape
    x = image.detach().reshape(shape[-2:]).cpu().numpy().astype(np.float32)
    h, w = x.shape
    small = cv2.resize(x, (max(2, round(w * factor)), max(2, round(h * factor))), interpolation=cv2.INTER_AREA)
    y = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(y)).reshape(shape).to(image.dtype)


class RandomJPEG(v2.Transform):
    """With probability ``p``: :func:`jpeg_roundtrip` at a quality drawn uniformly from ``quality``
    (inclusive) and an enlargement factor drawn uniformly from ``scale``. Randomness: global torch RNG."""

    def __init__(self, p: float, quality: tuple[int, int], scale: tuple[float, float] = (1.0, 1.0)):
        super().__init__()
        self.p, self.quality, self.scale = float(p), (int(quality[0]), int(quality[1])), tuple(map(float, scale))

    def make_params(self, flat_inputs):
        apply = float(torch.rand(())) < self.p
        q = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * float(torch.rand(()))
        return {"apply": apply, "quality": q, "scale": s}

    def transform(self, inpt, params):
        if not params["apply"] or not isinstance(inpt, torch.Tensor) or not inpt.is_floating_point():
            return inpt
        return jpeg_roundtrip(inpt, params["quality"], params["scale"])


class RandomResolution(v2.Transform):
    """With probability ``p``: :func:`resolution_roundtrip` with a factor drawn uniformly from ``scale``."""

    def __init__(self, p: float, scale: tuple[float, float]):
        super().__init__()
        self.p, self.scale = float(p), (float(scale[0]), float(scale[1]))

    def make_params(self, flat_inputs):
        apply = float(torch.rand(())) < self.p
        f = self.scale[0] + (self.scale[1] - self.scale[0]) * float(torch.rand(()))
        return {"apply": apply, "factor": f}

    def transform(self, inpt, params):
        if not params["apply"] or params["factor"] >= 1.0 or not isinstance(inpt, torch.Tensor):
            return inpt
        return resolution_roundtrip(inpt, params["factor"])


def build_augmentation(cfg: AugmentConfig) -> v2.Transform | None:
    """The per-image training transform described by ``cfg`` (None when disabled)."""
    if not cfg.enabled:
        return None
    steps: list[v2.Transform] = []
    # Storage first: in the data, resolution loss and recompression happened to the file.
    # (storage_stage "working": covidcxr.training.storage applies them before intensity + resize.)
    if cfg.storage_stage == "prepared":
        if cfg.resolution_p > 0:
            steps.append(RandomResolution(cfg.resolution_p, tuple(cfg.resolution_scale)))
        if cfg.jpeg_p > 0:
            steps.append(RandomJPEG(cfg.jpeg_p, tuple(cfg.jpeg_quality), tuple(cfg.jpeg_scale)))
    steps += [
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
