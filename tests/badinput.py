"""The bad-input corpus: a generator that writes a "mixed" folder of broken, hostile and good inputs.

Nothing here is committed as an image: :func:`write_corpus` writes every file at test time, from
synthetic arrays and from copies / mutations of the two shared DICOM files and one shared JPEG (read
from ``data_root``, i.e. ``../shared/data/cxr``). Use it from any test (``tests/`` is on ``sys.path``
under pytest)::

    from badinput import write_corpus

    def test_batch_predict_survives_the_corpus(tmp_path, data_root):
        cases = write_corpus(tmp_path / "corpus", data_root)
        for case in cases:
            ...  # case.path, case.expect ("ok" / "refused"), case.reason (substring of the reason)

Each :class:`Case` says what :func:`covidcxr.data.read_xray` (default options) must do with it:
``expect == "ok"`` reads; ``expect == "refused"`` raises ``ImageReadError`` (``case.error`` names
the exact class) whose reason contains ``case.reason`` and never ``case.not_in_reason``.
``case.regular_file`` is False for the FIFO, the links and the folder (they cannot be uploaded to
the web service; batch jobs meet them in folders). The FIFO and the non-UTF-8 file name exist only
where the platform allows them (POSIX, a file system that accepts arbitrary bytes in names).
"""

from __future__ import annotations

import copy
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The shared files the corpus derives from (relative to the shared data root).
SHARED_DICOM = "dicom/RG1_UNCR.dcm"
SHARED_J2K_DICOM = "dicom/RG1_J2KI.dcm"
SHARED_JPEG = "images/nih/pneumonia/00000499_008.jpg"

#: Bytes that are not valid UTF-8 (a Latin-1 "é" and a stray continuation byte): a file name a batch
#: job must be able to print and report without crashing.
NON_UTF8_NAME = b"scan-caf\xe9-\x80.jpg"

#: A line that must never come back in an error message (the text-file case quotes nothing).
SECRET_TEXT = "root:x:0:0:root:/root:/bin/bash"


#: Every case :func:`write_corpus` writes on Linux (the FIFO, the links and the non-UTF-8 name only
#: where the platform allows them).
KINDS = (
    "good_jpeg", "good_phantom_png", "tiny_1x1", "tiny_2x2", "strip_1x4000", "strip_20000x2", "elongated_1000x100",
    "all_black", "all_white", "constant_grey", "fully_transparent_png", "uniform_noise", "gaussian_noise_jpeg",
    "good_dicom", "rescale_slope_0", "palette_without_lut", "rgb_labelled_monochrome2",
    "number_of_frames_not_numeric", "rows_two_values", "too_much_pixel_data", "too_much_pixel_data_rgb",
    "truncated_uncompressed_dicom", "truncated_jpeg2000_dicom", "dicom_128_bytes", "dicom_132_bytes",
    "zero_bytes", "text_named_png", "folder_named_png", "symlink_loop", "symlink_cycle", "dangling_link",
    "link_to_dev_zero", "link_to_good", "fifo", "non_utf8_file_name",
)


@dataclass(frozen=True)
class Case:
    name: str                   # short identifier, e.g. "rescale_slope_0"
    path: Path                  # where the file (or link / FIFO / folder) is
    expect: str                 # "ok" or "refused"
    reason: str = ""            # substring the refusal reason must contain ("" for ok)
    error: str = ""             # exact exception class name for a refusal (ImageReadError / ImplausibleImageError)
    not_in_reason: str = ""     # substring the reason must NOT contain ("" = nothing in particular)
    regular_file: bool = True   # False: FIFO, symbolic link, folder

    @property
    def ok(self) -> bool:
        return self.expect == "ok"


# ---------------------------------------------------------------------------- synthetic pixels


def phantom(height: int = 384, width: int = 320, seed: int = 0) -> np.ndarray:
    """A smooth synthetic "chest-like" uint8 image (two dark lung fields, bright mediastinum, ribs).

    Not a radiograph, but it has the statistics the plausibility gate looks for (smooth, contrasted).
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / height, x / width
    img = 0.75 - 0.35 * np.exp(-(((x - 0.3) / 0.13) ** 2 + ((y - 0.5) / 0.28) ** 2))
    img -= 0.35 * np.exp(-(((x - 0.7) / 0.13) ** 2 + ((y - 0.5) / 0.28) ** 2))
    img += 0.08 * np.sin(2 * np.pi * 9 * y) * ((x < 0.45) | (x > 0.55))
    img += 0.02 * np.random.default_rng(seed).standard_normal((height, width))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------- DICOM mutations


def _small_dicom(data_root: Path):
    """The shared RG1_UNCR.dcm with its pixels subsampled 4x (489 x 461): fast, still a real CR header."""
    import pydicom

    ds = pydicom.dcmread(data_root / SHARED_DICOM)
    stored = ds.pixel_array[::4, ::4].copy()
    ds.PixelData = stored.tobytes()
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    return ds


def _save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _dicom_cases(folder: Path, data_root: Path) -> list[Case]:
    cases = []
    base = _small_dicom(data_root)
    cases.append(Case("good_dicom", _save(base, folder / "good_small.dcm"), "ok"))

    ds = copy.deepcopy(base)
    ds.RescaleSlope, ds.RescaleIntercept = 0, 0
    cases.append(Case("rescale_slope_0", _save(ds, folder / "rescale_slope_0.dcm"), "refused",
                      "RescaleSlope is 0", "ImageReadError"))

    ds = copy.deepcopy(base)
    ds.PhotometricInterpretation = "PALETTE COLOR"  # palette indices, but no Red/Green/Blue LUT
    cases.append(Case("palette_without_lut", _save(ds, folder / "palette_no_lut.dcm"), "refused",
                      "PALETTE COLOR DICOM without its colour lookup table", "ImageReadError"))

    grey8 = (base.pixel_array.astype(np.float64) / base.pixel_array.max() * 255).astype(np.uint8)
    rgb = copy.deepcopy(base)
    rgb.BitsAllocated, rgb.BitsStored, rgb.HighBit, rgb.PixelRepresentation = 8, 8, 7, 0
    rgb.SamplesPerPixel, rgb.PlanarConfiguration = 3, 0
    for key in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if key in rgb:
            delattr(rgb, key)
    rgb.PixelData = np.dstack([grey8] * 3).tobytes()
    ds = copy.deepcopy(rgb)
    ds.PhotometricInterpretation = "MONOCHROME2"
    cases.append(Case("rgb_labelled_monochrome2", _save(ds, folder / "rgb_as_monochrome2.dcm"), "refused",
                      "PhotometricInterpretation is MONOCHROME2", "ImageReadError"))

    # NumberOfFrames "1A" (as in pydicom's badVR.dcm): pydicom will not write it, so patch the bytes.
    ds = copy.deepcopy(base)
    ds.NumberOfFrames = "19"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    element = b"\x28\x00\x08\x00IS\x02\x0019"
    assert raw.count(element) == 1
    path = folder / "frames_not_numeric.dcm"
    path.write_bytes(raw.replace(element, element[:-2] + b"1A"))
    cases.append(Case("number_of_frames_not_numeric", path, "refused", "NumberOfFrames is not a number",
                      "ImageReadError"))

    ds = copy.deepcopy(base)
    ds.Rows = [base.Rows, base.Rows]
    cases.append(Case("rows_two_values", _save(ds, folder / "rows_two_values.dcm"), "refused",
                      "Rows has 2 values", "ImageReadError"))

    ds = copy.deepcopy(base)
    ds.PixelData = base.PixelData * 2
    cases.append(Case("too_much_pixel_data", _save(ds, folder / "too_much_pixel_data.dcm"), "refused",
                      "more than the", "ImageReadError"))

    ds = copy.deepcopy(rgb)
    ds.PhotometricInterpretation = "RGB"
    ds.Rows = base.Rows // 2  # the colour path, with twice the data the header needs
    cases.append(Case("too_much_pixel_data_rgb", _save(ds, folder / "too_much_pixel_data_rgb.dcm"), "refused",
                      "more than the", "ImageReadError"))

    whole = _save(base, folder / "whole.dcm").read_bytes()
    (folder / "whole.dcm").unlink()
    path = folder / "truncated_uncompressed.dcm"
    path.write_bytes(whole[: len(whole) * 3 // 4])  # cut inside the native pixel data
    cases.append(Case("truncated_uncompressed_dicom", path, "refused", "pixel data is incomplete", "ImageReadError"))

    j2k = (data_root / SHARED_J2K_DICOM).read_bytes()
    path = folder / "truncated_j2k.dcm"
    path.write_bytes(j2k[: len(j2k) // 2])
    cases.append(Case("truncated_jpeg2000_dicom", path, "refused", "pixel data is incomplete", "ImageReadError",
                      not_in_reason="no PixelData element"))

    uncompressed = (data_root / SHARED_DICOM).read_bytes()
    path = folder / "dicom_128_bytes.dcm"
    path.write_bytes(uncompressed[:128])  # the preamble only (it holds a TIFF header: "II*")
    cases.append(Case("dicom_128_bytes", path, "refused", "truncated DICOM", "ImageReadError",
                      not_in_reason="TIFF header"))
    path = folder / "dicom_132_bytes.dcm"
    path.write_bytes(uncompressed[:132])  # preamble + "DICM" and nothing else
    cases.append(Case("dicom_132_bytes", path, "refused", "truncated DICOM", "ImageReadError"))
    return cases


# ---------------------------------------------------------------------------- the corpus


def write_corpus(folder: str | os.PathLike, data_root: str | os.PathLike) -> list[Case]:
    """Write the bad-input corpus into ``folder`` (created) and return its cases, good ones included."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_root)
    cases: list[Case] = []

    def add(name, path, expect, reason="", error="", **kw):
        cases.append(Case(name, Path(path), expect, reason, error, **kw))

    # good files, so that the folder is "mixed"
    good = folder / "good.jpg"
    shutil.copyfile(data_root / SHARED_JPEG, good)
    add("good_jpeg", good, "ok")
    add("good_phantom_png", _png(folder / "phantom.png", phantom()), "ok")

    # size and shape
    add("tiny_1x1", _png(folder / "tiny_1x1.png", np.full((1, 1), 128, np.uint8)), "refused",
        "too small", "ImplausibleImageError")
    add("tiny_2x2", _png(folder / "tiny_2x2.png", np.array([[0, 255], [255, 0]], np.uint8)), "refused",
        "too small", "ImplausibleImageError")
    add("strip_1x4000", _png(folder / "strip_1x4000.png", phantom(1, 4000)), "refused",
        "too small", "ImplausibleImageError")
    add("strip_20000x2", _png(folder / "strip_20000x2.png", phantom(2, 20000)), "refused",
        "too elongated", "ImplausibleImageError")
    add("elongated_1000x100", _png(folder / "elongated_1000x100.png", phantom(100, 1000)), "refused",
        "too elongated", "ImplausibleImageError")

    # content
    add("all_black", _png(folder / "all_black.png", np.zeros((512, 512), np.uint8)), "refused",
        "near-constant", "ImplausibleImageError")
    add("all_white", _png(folder / "all_white.png", np.full((512, 512), 255, np.uint8)), "refused",
        "near-constant", "ImplausibleImageError")
    add("constant_grey", _png(folder / "constant_grey.png", np.full((400, 300), 128, np.uint8)), "refused",
        "near-constant", "ImplausibleImageError")
    rgba = np.dstack([np.stack([phantom()] * 3, axis=-1), np.zeros(phantom().shape, np.uint8)])
    path = folder / "transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)  # every pixel fully transparent: composited to black
    add("fully_transparent_png", path, "refused", "near-constant", "ImplausibleImageError")
    rng = np.random.default_rng(0)
    add("uniform_noise", _png(folder / "uniform_noise.png", rng.integers(0, 256, (512, 512), dtype=np.uint8)),
        "refused", "looks like noise", "ImplausibleImageError")
    path = folder / "gaussian_noise.jpg"
    noise = np.clip(128 + 40 * rng.standard_normal((600, 800)), 0, 255).astype(np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    add("gaussian_noise_jpeg", path, "refused", "looks like noise", "ImplausibleImageError")

    # DICOM mutations of the shared CR
    cases.extend(_dicom_cases(folder, data_root))

    # bytes that are not an image
    (folder / "empty.png").write_bytes(b"")
    add("zero_bytes", folder / "empty.png", "refused", "empty file (0 bytes)", "ImageReadError")
    (folder / "notes.png").write_text(SECRET_TEXT + "\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    add("text_named_png", folder / "notes.png", "refused", "text file, not an image", "ImageReadError",
        not_in_reason="root:x")

    # the file system
    (folder / "folder.png").mkdir(exist_ok=True)
    add("folder_named_png", folder / "folder.png", "refused", "is a folder", "ImageReadError", regular_file=False)
    if hasattr(os, "symlink"):
        loop = folder / "loop.png"
        os.symlink(loop.name, loop)  # points at itself
        add("symlink_loop", loop, "refused", "symlink loop", "ImageReadError", regular_file=False,
            not_in_reason="not found")
        a, b = folder / "cycle_a.png", folder / "cycle_b.png"
        os.symlink(b.name, a)
        os.symlink(a.name, b)
        add("symlink_cycle", a, "refused", "symlink loop", "ImageReadError", regular_file=False)
        dangling = folder / "dangling.png"
        os.symlink("missing-target.png", dangling)
        add("dangling_link", dangling, "refused", "broken symbolic link to missing-target.png", "ImageReadError",
            regular_file=False)
        if os.path.exists("/dev/zero"):
            zero = folder / "zero.png"
            os.symlink("/dev/zero", zero)
            add("link_to_dev_zero", zero, "refused", "character device", "ImageReadError", regular_file=False)
        link = folder / "link_to_good.jpg"
        os.symlink(good.name, link)
        add("link_to_good", link, "ok", regular_file=False)
    if hasattr(os, "mkfifo"):
        fifo = folder / "fifo.png"
        os.mkfifo(fifo)
        add("fifo", fifo, "refused", "named pipe (FIFO)", "ImageReadError", regular_file=False)
    try:
        weird = Path(os.fsdecode(os.path.join(os.fsencode(folder), NON_UTF8_NAME)))
        shutil.copyfile(data_root / SHARED_JPEG, weird)
    except (OSError, UnicodeError, ValueError):
        pass  # a file system that insists on valid UTF-8 names (macOS, Windows)
    else:
        add("non_utf8_file_name", weird, "ok")
    return cases
