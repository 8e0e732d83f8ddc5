"""The Pillow decoder: PNG, JPEG, TIFF and BMP (see :mod:`covidcxr.data.io` for the rules)."""

from __future__ import annotations

import io
import struct

import numpy as np

from covidcxr.data.decoded import LUMA_WEIGHTS, XRay, _check_pixel_count, _exc_text, _minmax
from covidcxr.errors import ImageReadError


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
        raise ImageReadError(name, f"refused as a possible decompression bomb: {_exc_text(exc)}") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError,
            struct.error, EOFError) as exc:
        raise ImageReadError(name, f"corrupt {fmt.upper()} header: {_exc_text(exc)}") from None
    if fmt == "png" and data.rfind(_PNG_IEND) < 0:
        # Pillow decodes a PNG whose IEND chunk is missing; an incomplete file is refused all the same.
        raise ImageReadError(name, "truncated PNG: the file ends before its IEND chunk")
    with img:
        width, height = img.size
        _check_pixel_count(name, width, height, max_pixels)
        try:
            n_frames = int(getattr(img, "n_frames", 1) or 1)  # TIFF: walks every page's header
        except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error, EOFError) as exc:
            raise ImageReadError(name, f"corrupt {fmt.upper()}: a later page's header is unreadable: "
                                       f"{_exc_text(exc)}") from None
        original_mode = img.mode
        try:
            img.load()  # force the full decode: truncation and corrupt data surface here
        except Image.DecompressionBombError as exc:
            raise ImageReadError(name, f"refused as a possible decompression bomb: {_exc_text(exc)}") from None
        except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error, EOFError) as exc:
            raise ImageReadError(name, f"truncated or corrupt {fmt.upper()} data: {_exc_text(exc)}") from None
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
            upright = ImageOps.exif_transpose(img)
        except Exception as exc:  # malformed EXIF: the pixels are fine but their orientation is unknown
            raise ImageReadError(name, f"unreadable EXIF orientation: {_exc_text(exc)}") from None
        try:
            pixels, bits = _pil_to_float(upright, sbit=_png_sbit(data) if fmt == "png" else None)
        except (OSError, ValueError, TypeError, KeyError, struct.error) as exc:
            raise ImageReadError(name, f"cannot convert {fmt.upper()} pixels of mode {upright.mode} to grey: "
                                       f"{_exc_text(exc)}") from None
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
