"""The DICOM decoder (pydicom): modality LUT, VOI, photometric interpretation, header consistency.

See :mod:`covidcxr.data.io` for the rules; the frontal-view table here is the one importers use too.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Sequence

import numpy as np

from covidcxr.data.decoded import LUMA_WEIGHTS, XRay, _check_pixel_count, _exc_text, _minmax
from covidcxr.data.pillow_reader import _bits_holding
from covidcxr.errors import ImageReadError, NotAChestXRayError


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

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # InvalidDicomError, struct.error, EOFError, ValueError, ...: no common base
        raise ImageReadError(name, f"unreadable DICOM header (truncated or corrupt): {_exc_text(exc)}") from None
    try:
        # pydicom parses element values lazily: surface a corrupt one here, by name
        for _ in ds.iterall():
            pass
        for _ in getattr(ds, "file_meta", None) or ():
            pass
    except Exception as exc:
        raise ImageReadError(name, f"corrupt DICOM header element: {_exc_text(exc)}") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(name, _describe_missing_pixels(data, ds))
    meta = _dicom_meta(ds, name)
    _check_transfer_syntax(ds, name)
    if not allow_non_frontal:
        _check_frontal_chest(ds, name)
    rows, cols = _dicom_int(ds, "Rows", name), _dicom_int(ds, "Columns", name)
    if rows < 1 or cols < 1:
        raise ImageReadError(name, f"DICOM Rows x Columns is {rows} x {cols}: no image")
    _check_pixel_count(name, cols, rows, max_pixels)
    frames = _dicom_int(ds, "NumberOfFrames", name, default=1)
    if frames > 1:
        raise ImageReadError(name, f"multi-frame DICOM ({frames} frames); covidcxr reads single radiographs")
    if frames < 1:
        raise ImageReadError(name, f"DICOM NumberOfFrames is {frames}: no image")
    samples = _dicom_int(ds, "SamplesPerPixel", name, default=1)
    photometric = meta["photometric"]
    _check_photometric(name, photometric, samples)
    if photometric != "PALETTE COLOR":
        _check_rescale(ds, name)
    _check_pixel_data_length(ds, name)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom / plugin errors have no common base class
        raise ImageReadError(name, f"DICOM pixel data cannot be decoded ({meta['transfer_syntax']}): "
                                   f"{_exc_text(exc)}") from None
    expected = (rows, cols) if samples == 1 else (rows, cols, samples)
    if tuple(stored.shape) != expected:
        raise ImageReadError(
            name, f"DICOM pixel data decodes to shape {tuple(stored.shape)}, not the {' x '.join(map(str, expected))} "
                  "that Rows x Columns (x SamplesPerPixel) say: the header and the pixel data disagree")
    if photometric == "PALETTE COLOR":
        pixels = _dicom_palette_to_grey(stored, ds, name)
        meta["window"] = {"source": "none (palette colour image through its lookup table)"}
    elif samples == 3:  # colour DICOM (e.g. a secondary capture of a film): RGB (pydicom converts YBR) -> luminance
        bits = _dicom_int(ds, "BitsStored", name, default=_dicom_int(ds, "BitsAllocated", name, default=8))
        if not 1 <= bits <= 16:
            raise ImageReadError(name, f"DICOM colour image with BitsStored {bits}; expected 1 to 16")
        pixels = stored.astype(np.float32) / float(2**bits - 1) @ LUMA_WEIGHTS
        meta["window"] = {"source": "none (colour image)"}
    else:
        try:
            pixels, meta["window"] = _dicom_grey_to_unit(stored, ds)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError, OverflowError,
                ZeroDivisionError) as exc:
            raise ImageReadError(name, f"invalid DICOM modality LUT / VOI (window) data: {_exc_text(exc)}") from None
        if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "") or "").upper() == "INVERSE":
            pixels = 1.0 - pixels  # MONOCHROME1: high values are dark; we want bones bright
            meta["inverted"] = True
        else:
            meta["inverted"] = False
    meta["original_shape"] = tuple(int(v) for v in pixels.shape)
    return XRay(np.asarray(pixels, dtype=np.float32), meta)


def _dicom_int(ds, keyword: str, name, *, default: int | None = None) -> int:
    """A DICOM attribute that must be one whole number (Rows, NumberOfFrames, ...), or ImageReadError."""
    try:
        value = ds.get(keyword)
    except Exception:
        raise ImageReadError(name, f"DICOM {keyword} cannot be parsed") from None
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        if default is None:
            raise ImageReadError(name, f"DICOM {keyword} is missing; it is required to read the pixels")
        return default
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        raise ImageReadError(name, f"DICOM {keyword} has {len(value)} values; it must be a single whole number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        # Not quoted: reasons never repeat the file's content.
        raise ImageReadError(name, f"DICOM {keyword} is not a number; it must be a single whole number") from None
    if not math.isfinite(number) or number != int(number):
        raise ImageReadError(name, f"DICOM {keyword} is not a whole number")
    return int(number)


def _dicom_float(ds, keyword: str, name) -> float | None:
    try:
        value = ds.get(keyword)
    except Exception:
        raise ImageReadError(name, f"DICOM {keyword} cannot be parsed") from None
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        raise ImageReadError(name, f"DICOM {keyword} has {len(value)} values; it must be a single number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ImageReadError(name, f"DICOM {keyword} is not a number") from None
    if not math.isfinite(number):
        raise ImageReadError(name, f"DICOM {keyword} is not a finite number")
    return number


_COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422")


def _check_photometric(name, photometric: str, samples: int) -> None:
    """PhotometricInterpretation and SamplesPerPixel must agree (an RGB array labelled MONOCHROME2 is refused)."""
    if samples not in (1, 3):
        raise ImageReadError(name, f"DICOM SamplesPerPixel is {samples}; only 1 (grey) or 3 (colour) can be read")
    if photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") and samples != 1:
        raise ImageReadError(
            name, f"inconsistent DICOM header: PhotometricInterpretation is {photometric} (one sample per pixel) "
                  f"but SamplesPerPixel is {samples} (colour pixels); the file cannot be read reliably")
    if photometric in _COLOUR_PHOTOMETRIC and samples != 3:
        raise ImageReadError(
            name, f"inconsistent DICOM header: PhotometricInterpretation is {photometric} (colour) but "
                  f"SamplesPerPixel is {samples}")
    if photometric and photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") + _COLOUR_PHOTOMETRIC:
        raise ImageReadError(name, f"unsupported DICOM PhotometricInterpretation {photometric}")
    if not photometric:
        raise ImageReadError(name, "DICOM PhotometricInterpretation is missing; cannot tell how to show the pixels")


def _check_rescale(ds, name) -> None:
    if ds.get("ModalityLUTSequence"):
        return  # the LUT, not the slope, maps stored values (pydicom's apply_modality_lut prefers it)
    slope = _dicom_float(ds, "RescaleSlope", name)
    _dicom_float(ds, "RescaleIntercept", name)
    if slope == 0.0:
        raise ImageReadError(name, "DICOM RescaleSlope is 0: every pixel would map to the same value "
                                   "(RescaleIntercept), the image would be a constant; the header is broken")


def _check_pixel_data_length(ds, name) -> None:
    """Native (uncompressed) pixel data must be exactly as long as Rows x Columns x ... need (plus 1 pad byte)."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_encapsulated or "PixelData" not in ds:
        return
    from pydicom.pixels.utils import get_expected_length

    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except Exception:
        return  # pydicom cannot say either; its decoder will judge (and the guard catches what it raises)
    actual = len(ds.PixelData)
    if actual < expected:
        raise ImageReadError(
            name, f"truncated DICOM: the pixel data is incomplete ({actual:,} of the {expected:,} bytes that "
                  "Rows x Columns x BitsAllocated need)")
    if actual > expected + (expected % 2) + 1:
        raise ImageReadError(
            name, f"inconsistent DICOM: the pixel data holds {actual:,} bytes, more than the {expected:,} that "
                  "Rows x Columns x SamplesPerPixel x BitsAllocated need; the header and the pixel data disagree")


def _dicom_palette_to_grey(stored: np.ndarray, ds, name) -> np.ndarray:
    """PALETTE COLOR: indices -> the file's red/green/blue lookup tables -> luminance in [0, 1]."""
    from pydicom.pixels import apply_color_lut

    missing = [c for c in ("Red", "Green", "Blue")
               if f"{c}PaletteColorLookupTableDescriptor" not in ds
               or not (f"{c}PaletteColorLookupTableData" in ds or f"Segmented{c}PaletteColorLookupTableData" in ds)]
    if missing:
        raise ImageReadError(
            name, "PALETTE COLOR DICOM without its colour lookup table (no "
                  f"{'/'.join(missing)}PaletteColorLookupTable descriptor and data); the stored values are "
                  "palette indices, not intensities, so the image cannot be read")
    try:
        rgb = apply_color_lut(stored, ds)
        entries, first, nominal = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        entries = entries or 65536
        info = np.iinfo(stored.dtype)
        indices = np.arange(max(first, info.min), min(first + entries, info.max + 1)).astype(stored.dtype)
        lut_max = int(apply_color_lut(indices, ds).max())
    except Exception as exc:
        raise ImageReadError(name, f"invalid DICOM palette colour lookup table: {_exc_text(exc)}") from None
    if rgb.shape != stored.shape + (3,):
        raise ImageReadError(name, f"DICOM palette lookup table gave shape {rgb.shape}, expected {stored.shape + (3,)}")
    # The LUT's own range, not its nominal depth: 8-bit colours are often stored in 16-bit LUT entries.
    bits = min(nominal if nominal in (8, 16) else 16, _bits_holding(lut_max))
    return rgb.astype(np.float32) / float(2**bits - 1) @ LUMA_WEIGHTS


_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian
_SEQUENCE_DELIMITER = (b"\xfe\xff\xdd\xe0", b"\xff\xfe\xe0\xdd")  # (FFFE,E0DD)


def _describe_missing_pixels(data: bytes, ds) -> str:
    """Why a DICOM has no pixel data: truncated (the usual case) or a non-image object (SR, ...)."""
    size = len(data)
    for tag, delimiter in zip(_PIXEL_DATA_TAGS, _SEQUENCE_DELIMITER):
        pos = data.rfind(tag, 132)
        if pos < 0:
            continue
        little = tag == _PIXEL_DATA_TAGS[0]
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"UN", b"OL", b"OV"):
            header, length_bytes = 12, data[pos + 8 : pos + 12]
        else:
            header, length_bytes = 8, data[pos + 4 : pos + 8]
        if len(length_bytes) < 4:
            return (f"truncated DICOM: the file ends inside its PixelData element header ({size:,} bytes); "
                    "the pixel data is incomplete")
        length = struct.unpack("<I" if little else ">I", length_bytes)[0]
        if length == 0xFFFFFFFF and data.find(delimiter, pos + header) < 0:
            return (f"truncated DICOM: the file ends inside its compressed pixel data ({size:,} bytes, no end "
                    "of the encapsulated fragments); the pixel data is incomplete")
        if length != 0xFFFFFFFF and pos + header + length > size:
            return (f"truncated DICOM: the pixel data is incomplete ({size - pos - header:,} of {length:,} "
                    "bytes present)")
    meta = getattr(ds, "file_meta", None)
    try:
        group_length = int(meta.get("FileMetaInformationGroupLength")) if meta is not None else None
    except (TypeError, ValueError):
        group_length = None
    if size <= 132:
        return "truncated DICOM: nothing after the 128-byte preamble and 'DICM' marker (no header, no pixels)"
    if group_length is not None and 144 + group_length > size:
        return (f"truncated DICOM: the file ends inside its file meta information ({size:,} bytes; the meta "
                f"header alone needs {144 + group_length:,})")
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    sop_name = getattr(sop, "name", str(sop)) if sop else ""
    if len(ds) == 0:
        return f"truncated DICOM: the file ends after its file meta information ({size:,} bytes), no data set"
    if "Rows" in ds or "Columns" in ds or "Image Storage" in sop_name or "BitsAllocated" in ds:
        what = f"a {sop_name}" if sop_name else "an image (it has Rows / Columns)"
        return (f"DICOM file has no pixel data although it describes {what}: the file is probably truncated "
                "or incomplete (no PixelData element)")
    kind = f"SOP class {sop_name}" if sop_name else "no SOP class"
    return f"DICOM file has no pixel data (no PixelData element; {kind}), nothing to read"


def _dicom_meta(ds, name) -> dict:
    def text(keyword: str) -> str:
        try:
            value = ds.get(keyword, "")
        except Exception:
            return ""
        return "" if value is None else str(value).strip()

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "format": "dicom",
        "original_mode": text("PhotometricInterpretation"),
        "bits": _dicom_int(ds, "BitsStored", name, default=0),
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
