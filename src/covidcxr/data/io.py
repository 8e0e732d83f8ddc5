"""Reading chest X-rays: one function, ``read_xray``, for PNG / JPEG / TIFF / BMP and DICOM.

Every reader returns the same thing: an :class:`XRay` whose ``pixels`` are a float32 H x W array in
[0, 1] with **bones bright** (the MONOCHROME2 convention all covidcxr models are trained on), plus a
``meta`` dict describing where the numbers came from. The format is decided by the file's content
(magic bytes), never by its extension, so a DICOM called ``scan.png`` and a text file called
``image.png`` are both handled correctly.

Anything that is not a usable frontal chest radiograph raises :class:`~covidcxr.errors.ImageReadError`
(or its subclass :class:`~covidcxr.errors.NotAChestXRayError`) with the file name and the reason;
callers never see a library traceback. Choices worth knowing (see ``docs/data-io.md``):

* 8-bit grey images are divided by 255; colour images become ITU-R 601 luminance (the weights Pillow
  uses for ``convert("L")``); images with an alpha channel (RGBA, LA, palette with transparency) are
  composited on black first, as the shared data set's processed copies were.
* 16-bit images are scaled by their *real* bit depth: a PNG ``sBIT`` chunk if present, otherwise the
  smallest of 8/10/12/14/16 bits that holds the image's maximum (a 12-bit detector saved in a 16-bit
  PNG would otherwise look almost black).
* DICOM: modality LUT / rescale, then the file's own VOI (VOI LUT sequence, else window centre/width,
  first of several); without any VOI the modality values are min-max scaled. MONOCHROME1 (or a
  Presentation LUT Shape of INVERSE) is inverted so bones are bright.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from covidcxr.errors import ImageReadError, NotAChestXRayError

#: Bump when the pixels ``read_xray`` returns for the same file change (the working-size cache keys on it).
READER_VERSION = "1"

#: Refuse images larger than this many pixels before decoding them (decompression-bomb guard).
#: 64 MP is an 8000 x 8000 image; the largest chest radiographs are about 4300 x 4300 (18 MP).
DEFAULT_MAX_PIXELS = 64_000_000

#: ITU-R BT.601 luma weights, the ones Pillow's ``convert("L")`` uses.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(eq=False)
class XRay:
    """A decoded radiograph: ``pixels`` float32 H x W in [0, 1] with bones bright, and ``meta``."""

    pixels: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.pixels.shape)


# ---------------------------------------------------------------------------- format sniffing

# DICOM comes first: its 128-byte preamble may itself hold a TIFF header (dual-personality files,
# e.g. the shared RG1_UNCR.dcm starts with "II*"), and the DICOM reading is the right one.
_MAGIC: list[tuple[int, bytes, str]] = [
    (128, b"DICM", "dicom"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpeg"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"II+\x00", "tiff"),  # BigTIFF
    (0, b"MM\x00+", "tiff"),
    (0, b"BM", "bmp"),
]

# Formats we recognise only to say clearly that they are not supported.
_UNSUPPORTED_MAGIC: list[tuple[bytes, str]] = [
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF container (WebP / AVI)"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 (.jp2) file"),
    (b"\xff\x4f\xff\x51", "a raw JPEG 2000 codestream"),
]

HEAD_BYTES = 132  # enough for every magic above, including the DICOM preamble


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file ('png', 'jpeg', 'tiff', 'bmp', 'dicom'), or None."""
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _describe_unknown(head: bytes) -> str:
    for magic, what in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return f"{what}, not a supported X-ray format (PNG, JPEG, TIFF, BMP or DICOM); convert it to PNG"
    sample = head[:64]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"this is a text file, not an image (it starts with {text.strip()[:40]!r})"
    if len(head) >= 4 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[2:4] in (b"\x00\x00", b"\x05\x00", b"\x16\x00"):
        return ("looks like a DICOM data set without the 128-byte preamble and 'DICM' marker; "
                "re-save it as a DICOM Part 10 file (e.g. `dcmconv`)")
    return (f"unrecognised file format (first bytes {head[:8].hex(' ')}); "
            "supported: PNG, JPEG, TIFF, BMP, DICOM (detected by content, not extension)")


# ---------------------------------------------------------------------------- public API


def read_xray(path: str | os.PathLike, *, allow_non_frontal: bool = False,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> XRay:
    """Read a chest radiograph from ``path`` (PNG, JPEG, TIFF, BMP, or DICOM of any extension).

    Raises :class:`ImageReadError` naming the file and the reason for anything that cannot be read,
    and :class:`NotAChestXRayError` for a DICOM that says it is not a frontal chest radiograph
    (CT, MR, lateral, ...) unless ``allow_non_frontal=True``.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file: {exc.strerror or exc}") from None
    return decode_xray(data, path, allow_non_frontal=allow_non_frontal, max_pixels=max_pixels)


def decode_xray(data: bytes, name: str | os.PathLike = "<bytes>", *, allow_non_frontal: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> XRay:
    """Decode an X-ray from the bytes of a file (e.g. an upload); ``name`` is used in error messages.

    Same rules and result as :func:`read_xray`; the working-size cache uses it so that the bytes it
    hashes are exactly the bytes it decodes.
    """
    if not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels={max_pixels!r}: must be a positive integer")
    if len(data) == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    head = bytes(data[:HEAD_BYTES])
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageReadError(name, _describe_unknown(head))
    reader = _READERS[fmt]
    xray = reader(data, name, fmt=fmt, allow_non_frontal=allow_non_frontal, max_pixels=int(max_pixels))
    pixels = np.ascontiguousarray(np.clip(xray.pixels, 0.0, 1.0), dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ImageReadError(name, f"decoded to an array of shape {pixels.shape}, not a 2-D image")
    if not np.isfinite(pixels).all():
        raise ImageReadError(name, "decoded pixels contain NaN or infinity")
    xray.pixels = pixels
    xray.meta.setdefault("original_shape", tuple(int(v) for v in pixels.shape))
    xray.meta["reader_version"] = READER_VERSION
    return xray


# ---------------------------------------------------------------------------- Pillow formats

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF", "bmp": "BMP"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + its (constant) CRC


def _read_pil(data: bytes, name, *, fmt: str, allow_non_frontal: bool, max_pixels: int) -> XRay:
    from PIL import Image, ImageFile, ImageOps

    # A truncated medical image must be refused, never padded with grey: make sure nobody in this
    # process switched Pillow's lenient mode on.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]])
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"refused as a possible decompression bomb: {exc}") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageReadError(name, f"corrupt {fmt.upper()} header: {exc}") from None
    if fmt == "png" and data.rfind(_PNG_IEND) < 0:
        # Pillow decodes a PNG whose IEND chunk is missing; an incomplete file is refused all the same.
        raise ImageReadError(name, "truncated PNG: the file ends before its IEND chunk")
    with img:
        width, height = img.size
        _check_pixel_count(name, width, height, max_pixels)
        n_frames = int(getattr(img, "n_frames", 1) or 1)
        original_mode = img.mode
        try:
            img.load()  # force the full decode: truncation and corrupt data surface here
        except Image.DecompressionBombError as exc:
            raise ImageReadError(name, f"refused as a possible decompression bomb: {exc}") from None
        except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
            raise ImageReadError(name, f"truncated or corrupt {fmt.upper()} data: {exc}") from None
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
            upright = ImageOps.exif_transpose(img)
        except Exception as exc:  # malformed EXIF: the pixels are fine but their orientation is unknown
            raise ImageReadError(name, f"unreadable EXIF orientation: {exc}") from None
        pixels, bits = _pil_to_float(upright, sbit=_png_sbit(data) if fmt == "png" else None)
    meta = {"format": fmt, "original_mode": original_mode, "bits": bits,
            "original_shape": tuple(int(v) for v in pixels.shape), "exif_orientation": orientation}
    if n_frames > 1:
        meta["n_frames"] = n_frames  # multi-page TIFF: the first page is the image
    return XRay(pixels, meta)


def _pil_to_float(img, sbit: int | None) -> tuple[np.ndarray, int]:
    """Pillow image of any mode -> (float32 H x W in [0, 1], bit depth used to scale)."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32), 1
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0, 8
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            return _minmax(values), 32
        bits = sbit if sbit else _bits_holding(int(values.max()))
        return values.astype(np.float32) / float(2**bits - 1), bits
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.min() >= 0.0 and values.max() <= 1.0:
            return values, 32
        return _minmax(values), 32
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    rgba = np.asarray(img.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    rgb = rgba[..., :3]
    if has_alpha:
        rgb = rgb * rgba[..., 3:4]  # composite on black
    return rgb @ LUMA_WEIGHTS, 8


def _bits_holding(maximum: int) -> int:
    for bits in (8, 10, 12, 14, 16):
        if maximum < 2**bits:
            return bits
    return 16


def _minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _png_sbit(data: bytes) -> int | None:
    """Significant bits of a PNG's grey/colour channels from its ``sBIT`` chunk (Pillow ignores it)."""
    pos = 8
    colour_type = None
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if ctype == b"IHDR" and len(body) >= 10:
            colour_type = body[9]
        elif ctype == b"sBIT" and body:
            # grey: 1 byte, grey+alpha: 2 (ignore alpha), RGB / palette: 3, RGBA: 4 (ignore alpha)
            channels = {0: 1, 4: 1, 2: 3, 3: 3, 6: 3}.get(colour_type, len(body))
            return max(body[:channels]) or None
        elif ctype in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _check_pixel_count(name, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(
            name, f"refused as a possible decompression bomb: {width} x {height} = {width * height:,} pixels "
                  f"exceeds max_pixels={max_pixels:,} (pass a larger max_pixels if the file is trusted)")


# ---------------------------------------------------------------------------- DICOM

#: Modalities that can hold a projection chest radiograph. OT / SC (other, secondary capture) are
#: common for exported or digitised films, so they are accepted and judged by view and body part.
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT", "SC"})
#: View positions that are not frontal.
NON_FRONTAL_VIEWS = {
    **dict.fromkeys(("LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"), "lateral"),
    **dict.fromkeys(("LAO", "RAO", "LPO", "RPO", "LLO", "RLO", "OBL", "OBLIQUE"), "oblique"),
}
#: Body parts (DICOM Body Part Examined defined terms) that are certainly not the chest.
NON_CHEST_BODY_PARTS = frozenset({
    "HEAD", "SKULL", "BRAIN", "FACE", "JAW", "TMJ", "SINUS", "CSPINE", "TSPINE", "LSPINE", "SSPINE",
    "COCCYX", "SPINE", "NECK", "ABDOMEN", "PELVIS", "HIP", "KNEE", "ANKLE", "FOOT", "TOE", "HEEL",
    "LEG", "FEMUR", "TIBIA", "FIBULA", "HAND", "FINGER", "THUMB", "WRIST", "FOREARM", "ELBOW", "ARM",
    "HUMERUS", "UPRARM", "LOWLEG", "UPRLEG", "EXTREMITY", "BREAST", "KIDNEY", "BLADDER", "SHOULDER",
})


def _read_dicom(data: bytes, name, *, fmt: str, allow_non_frontal: bool, max_pixels: int) -> XRay:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, KeyError, struct.error, EOFError) as exc:
        raise ImageReadError(name, f"unreadable DICOM header: {exc}") from None
    meta = _dicom_meta(ds)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = f"SOP class {sop.name}" if sop else "no SOP class"
        raise ImageReadError(name, f"DICOM file has no pixel data (no PixelData element; {kind}), nothing to read")
    _check_transfer_syntax(ds, name)
    if not allow_non_frontal:
        _check_frontal_chest(ds, name)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_pixel_count(name, cols, rows, max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(name, f"multi-frame DICOM ({frames} frames); covidcxr reads single radiographs")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom / plugin errors have no common base class
        raise ImageReadError(name, f"DICOM pixel data cannot be decoded ({meta['transfer_syntax']}): {exc}") from None
    if stored.ndim == 3:  # colour DICOM (e.g. a secondary capture of a film): RGB -> luminance
        pixels = stored.astype(np.float32) / float(2 ** int(ds.BitsStored) - 1) @ LUMA_WEIGHTS
        meta["window"] = {"source": "none (colour image)"}
    else:
        try:
            pixels, meta["window"] = _dicom_grey_to_unit(stored, ds)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as exc:
            raise ImageReadError(name, f"invalid DICOM modality LUT / VOI (window) data: {exc}") from None
        if meta["photometric"] == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
            pixels = 1.0 - pixels  # MONOCHROME1: high values are dark; we want bones bright
            meta["inverted"] = True
        else:
            meta["inverted"] = False
    meta["original_shape"] = tuple(int(v) for v in pixels.shape)
    return XRay(np.asarray(pixels, dtype=np.float32), meta)


def _dicom_meta(ds) -> dict:
    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return "" if value is None else str(value).strip()

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "format": "dicom",
        "original_mode": text("PhotometricInterpretation"),
        "bits": int(ds.get("BitsStored", 0) or 0),
        "view_position": text("ViewPosition").upper(),
        "modality": text("Modality").upper(),
        "body_part": text("BodyPartExamined").upper(),
        "patient_id": text("PatientID"),
        "study_date": text("StudyDate"),
        "photometric": text("PhotometricInterpretation").upper(),
        "transfer_syntax": _describe_uid(ts) if ts else "missing",
    }


def _check_transfer_syntax(ds, name) -> None:
    from pydicom.pixels import get_decoder

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        raise ImageReadError(name, "DICOM file meta has no Transfer Syntax UID; cannot tell how pixels are encoded")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageReadError(
            name, f"unsupported DICOM transfer syntax {_describe_uid(ts)}; convert it to an uncompressed or "
                  "JPEG / JPEG 2000 / RLE syntax (e.g. `gdcmconv --raw`)") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise ImageReadError(name, f"DICOM transfer syntax {_describe_uid(ts)} needs {missing}")


def _describe_uid(uid) -> str:
    return f"{uid.name} ({uid})" if uid.name != str(uid) else f"{uid} (unknown UID)"


def _check_frontal_chest(ds, name) -> None:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper().replace(" ", "")
    hint = "; pass allow_non_frontal=True (CLI: --allow-non-frontal) to read it anyway"
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise NotAChestXRayError(
            name, f"DICOM Modality is {modality}, not a projection radiograph "
                  f"({'/'.join(sorted(RADIOGRAPH_MODALITIES))}){hint}")
    if view in NON_FRONTAL_VIEWS:
        raise NotAChestXRayError(name, f"DICOM ViewPosition is {view} ({NON_FRONTAL_VIEWS[view]}), "
                                       f"not a frontal (PA/AP) view{hint}")
    if body in NON_CHEST_BODY_PARTS:
        raise NotAChestXRayError(name, f"DICOM BodyPartExamined is {body}, not the chest{hint}")


def _dicom_grey_to_unit(stored: np.ndarray, ds) -> tuple[np.ndarray, dict]:
    """Stored values -> modality LUT -> the file's VOI (LUT or window) -> [0, 1] (before MONOCHROME1 inversion)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, ds)
    has_lut = bool(ds.get("VOILUTSequence")) and all(
        ds.VOILUTSequence[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return _minmax(values), {"source": "min-max of modality values (the file has no VOI LUT or window)"}
    windowed = apply_voi_lut(values, ds, prefer_lut=True)
    if has_lut:
        descriptor = list(ds.VOILUTSequence[0].LUTDescriptor)
        entries = descriptor[0] or 2**16
        lut_out = apply_voi_lut(np.arange(descriptor[1], descriptor[1] + entries, dtype=np.int64), ds, prefer_lut=True)
        # The LUT's own range, not its nominal bit depth: vendors often declare 16 bits for 12-bit data.
        lo, hi = float(lut_out.min()), float(lut_out.max())
        window = {"source": "file VOI LUT", "explanation": str(ds.VOILUTSequence[0].get("LUTExplanation", ""))}
    else:
        with np.errstate(over="ignore"):
            lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e30, 1e30]), ds))
        window = {"source": "file window", "center": _first(ds.WindowCenter), "width": _first(ds.WindowWidth),
                  "function": str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")}
    if hi <= lo:
        return _minmax(values), {"source": "min-max (the file's VOI has an empty output range)"}
    return ((np.asarray(windowed, dtype=np.float64) - lo) / (hi - lo)).astype(np.float32), window


def _first(value) -> float:
    """First of a possibly multi-valued DICOM number (pydicom applies window 0 of several)."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


# ---------------------------------------------------------------------------- registry

#: format name -> reader. Add a format by registering its magic bytes in ``_MAGIC`` and a reader here.
_READERS: dict[str, Callable[..., XRay]] = {
    "png": _read_pil,
    "jpeg": _read_pil,
    "tiff": _read_pil,
    "bmp": _read_pil,
    "dicom": _read_dicom,
}

SUPPORTED_FORMATS = tuple(_READERS)
