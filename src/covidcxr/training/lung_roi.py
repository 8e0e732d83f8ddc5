"""Training with ``preprocess.roi: lungs``: bring the lung segmenter into the run and pin it.

:func:`attach_lung_segmenter` loads the segmenter ``data.lung_segmenter`` names (``default``: the one
shipped with covidcxr), copies it into ``RUN/segmenter`` so the classifier run stays self-contained,
and writes its weights' SHA-256 into the run's preprocessing spec (``preprocess.segmenter_sha256``).
Inference (:attr:`covidcxr.models.run.RunView.lung_finder`) loads that copy and refuses any other
segmenter, so the lungs are found by the same model in training, evaluation and serving.
"""

from __future__ import annotations

from pathlib import Path

from covidcxr.data.lung_roi import LungFinder
from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.errors import ConfigError
from covidcxr.models.lung_finder import copy_segmenter, load_lung_finder, segmenter_dir


def attach_lung_segmenter(config, spec: PreprocessSpec, out_dir: Path, *,
                          write: bool = True) -> tuple[PreprocessSpec, LungFinder | None]:
    """``(spec with segmenter_sha256, lung finder)``; ``(spec, None)`` when the spec keeps the full image.

    ``write=False`` (the other ranks of a DDP job) loads the segmenter without copying it into the run.
    """
    if spec.roi == "full":
        return spec, None
    source = segmenter_dir(config.data.lung_segmenter)
    finder = load_lung_finder(source)
    if spec.segmenter_sha256 is not None and spec.segmenter_sha256 != finder.sha256:
        raise ConfigError(f"preprocess.segmenter_sha256 is {spec.segmenter_sha256[:12]}... but data.lung_segmenter "
                          f"({source}) has weights {finder.sha256[:12]}...; leave segmenter_sha256 out (training "
                          "fills it in) or point data.lung_segmenter at the segmenter it names")
    if write:
        copy_segmenter(source, out_dir)
    return spec.model_copy(update={"segmenter_sha256": finder.sha256}), finder
