"""Exceptions with messages a user can act on.

Every error names the file (or row / column) and the reason, so that a batch job can report what
it skipped and why, and the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class CovidCXRError(Exception):
    """Base class: anything covidcxr raises on purpose."""


class ImageReadError(CovidCXRError):
    """A file could not be read as a chest X-ray."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotAChestXRayError(ImageReadError):
    """The file decodes but is not a frontal chest radiograph (CT, lateral, ...).

    Raised separately so that callers can offer an override (e.g. ``allow_non_frontal=True``).
    """


class ImplausibleImageError(ImageReadError):
    """The file decodes but the image is not plausibly a radiograph (too small, too elongated,
    near-constant, noise); see :mod:`covidcxr.data.plausibility`.

    Raised separately so that callers can offer an override (``checks=InputChecks(...)`` or
    ``checks=None``).
    """


class ManifestError(CovidCXRError):
    """A manifest is invalid; the message names the row and column."""


class ConfigError(CovidCXRError):
    """A configuration value is invalid; the message names the key."""


class WeightsError(CovidCXRError):
    """Model weights are missing, corrupt or do not match their recorded SHA-256."""


def validation_problems(exc, root: str = "", unknown_key: str | None = None) -> str:
    """A pydantic ``ValidationError`` as one line: ``a.b: message; c: message``. ``root`` names an
    error without a location; ``unknown_key`` replaces pydantic's text for keys the model forbids."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or root}: "
        f"{unknown_key if unknown_key is not None and e['type'] == 'extra_forbidden' else e['msg']}"
        for e in exc.errors())
