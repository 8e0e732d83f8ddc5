"""The Grad-CAM overlay as a DICOM Secondary Capture (highdicom), with the probability burned in.

The picture is the one overlay renderer's (:func:`covidcxr.explain.overlay.blend_overlay`) on the
image the prediction used, under a black banner that states P(positive class), the decision at the
run's threshold, the model and "RESEARCH USE ONLY - NOT A DIAGNOSIS". Burned-in text is what every
viewer shows (a presentation state's text is not drawn by all of them), so the object says
``BurnedInAnnotation YES``. It references the source image and goes into the source study.
"""

from __future__ import annotations

import numpy as np

from covidcxr.models.predict import PredictionRecord
from covidcxr.serving.dicom.report import MANUFACTURER, SERIES_DESCRIPTION

OVERLAY_SERIES_NUMBER = 9902
#: Shortest side the overlay is drawn at (the working-size image is enlarged so the text stays legible).
MIN_SIDE = 512


def _number(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.2e}"


def banner_lines(record: PredictionRecord, run) -> list[str]:
    """The text burned into the overlay."""
    pos = run.positive_index
    threshold = run.threshold
    lines = []
    if pos is not None:
        lines.append(f"P({run.classes[pos]}) = {_number(float(record.probabilities[pos]))}")
    lines.append(f"decision: {record.predicted}" + (f" (threshold {_number(threshold)})" if threshold is not None
                                                    and pos is not None else " (most probable class)"))
    target = run.classes[pos] if pos is not None else "predicted class"
    lines.append(f"Grad-CAM for '{target}' - covidcxr {run.record.architecture} {run.model_sha256[:12]}")
    lines.append("RESEARCH USE ONLY - NOT A DIAGNOSIS")
    return lines


def overlay_image(record: PredictionRecord, heat: np.ndarray, run) -> np.ndarray:
    """uint8 H x W x 3 RGB: the overlay under the banner of :func:`banner_lines`."""
    import cv2

    from covidcxr.explain.overlay import blend_overlay

    rgb = blend_overlay(record.input.pixels, heat)
    h, w = rgb.shape[:2]
    scale = max(1.0, MIN_SIDE / min(h, w))
    if scale > 1.0:
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
        h, w = rgb.shape[:2]
    lines = banner_lines(record, run)
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(w / 700))
    # the longest line fills at most 96% of the width
    width_at_1 = max(cv2.getTextSize(t, font, 1.0, thickness)[0][0] for t in lines)
    font_scale = min(1.2, 0.96 * w / width_at_1)
    line_h = int(cv2.getTextSize("Ag", font, font_scale, thickness)[0][1] * 1.9) + 2
    banner = np.zeros((line_h * len(lines) + line_h // 2, w, 3), np.uint8)
    for i, text in enumerate(lines):
        colour = (255, 255, 0) if text.startswith("RESEARCH") else (255, 255, 255)
        cv2.putText(banner, text, (int(0.02 * w), line_h * (i + 1)), font, font_scale, colour, thickness, cv2.LINE_AA)
    out = np.concatenate([banner, rgb], axis=0)
    return np.ascontiguousarray(out)


def build_overlay(source, record: PredictionRecord, heat: np.ndarray, run, *, series_uid: str, sop_uid: str,
                  instance_number: int = 1):
    """The Secondary Capture of the overlay of ``record`` (made from ``source``, the received image's header)."""
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset

    pixels = overlay_image(record, heat, run)
    orientation = source.get("PatientOrientation")
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=instance_number, manufacturer=MANUFACTURER,
        patient_orientation=tuple(str(v) for v in orientation) if orientation and len(orientation) == 2 else None,
        transfer_syntax_uid="1.2.840.10008.1.2.1", series_description=SERIES_DESCRIPTION)
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "Grad-CAM overlay of the covidcxr prediction; probability burned in"
    sc.ImageComments = " | ".join(banner_lines(record, run))[:10240]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc
