"""CycleGAN losses and the image buffer (Shrivastava et al. 2017), as the reference implementation has them.

* LSGAN (Mao et al. 2017): mean squared error of every PatchGAN score against 1 (real) or 0 (fake).
* Cycle consistency: L1 between an image and its round trip, weight ``lambda_cycle``.
* Identity: L1 between a target-domain image and the generator's output for it, weight
  ``lambda_identity x lambda_cycle`` (keeps the grey levels of an image that needs no change).
* The discriminators see fakes from an :class:`ImagePool` of the last 50 generated images (half the time a
  stored one), which stabilises training. The pool's choices use the step's own random generator, and its
  contents travel in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def lsgan(scores: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))


def discriminator_loss(disc, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 x (LSGAN on real + LSGAN on the (buffered, detached) fake), as in the reference implementation."""
    return 0.5 * (lsgan(disc(real), True) + lsgan(disc(fake.detach()), False))


class ImagePool:
    """Buffer of up to ``size`` generated images; ``query`` returns a batch mixing new and stored ones."""

    def __init__(self, size: int = 50):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0).clone()
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif rng.random() < 0.5:
                k = int(rng.integers(0, self.size))
                out.append(self.images[k].clone())
                self.images[k] = image
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        return {"size": self.size, "images": torch.cat(self.images, 0) if self.images else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        stored = state["images"]
        self.images = [stored[i:i + 1].clone() for i in range(len(stored))] if stored.numel() else []


def linear_decay(step: int, steps: int, decay: int) -> float:
    """Learning-rate factor: 1 for the first ``steps - decay`` steps, then linearly down to 0 at ``steps``."""
    hold = steps - decay
    if step < hold or decay == 0:
        return 1.0
    return max(0.0, 1.0 - (step - hold + 1) / (decay + 1))
