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
  Presentation LUT Shape of INVERSE) is inverted so bones are bright. PALETTE COLOR goes through its
  colour lookup table; a RescaleSlope of 0, or a header that disagrees with the pixel data (colour
  pixels labelled MONOCHROME, more or fewer pixel bytes than Rows x Columns need), is refused.
* Files are read through :func:`read_file_bytes`, which refuses special files (FIFOs, devices,
  sockets) before opening them, names symlink loops and broken links, and refuses files larger than
  ``max_bytes`` without reading them.
* After decoding, the plausibility gate (:mod:`covidcxr.data.plausibility`) refuses images that are
  too small, too elongated, near-constant or noise, with
  :class:`~covidcxr.errors.ImplausibleImageError`; ``checks=None`` switches it off.

Every failure, whichever library raised it, ends as an :class:`ImageReadError`; reasons never quote
the file's content (a text file is called a text file, not shown).
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from covidcxr.data.plausibility import DEFAULT_CHECKS, InputChecks, check_plausible
from covidcxr.errors import ImageReadError, NotAChestXRayError

log = logging.getLogger(__name__)

#: Bump when the pixels ``read_xray`` returns for the same file change (the working-size cache keys on it).
#: 2: plausibility gate, PALETTE COLOR through its LUT, inconsistent DICOM headers refused.
READER_VERSION = "2"

#: Refuse files larger than this many bytes without reading them (:func:`read_file_bytes`). The
#: largest uncompressed chest radiographs are about 40 MB (4300 x 4300 x 16 bit); 1 GiB leaves room
#: for anything real while keeping one request from filling the memory.
DEFAULT_MAX_FILE_BYTES = 1 << 30

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
    """Why ``head`` is not a supported image, without quoting any of the file's content."""
    for magic, what in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return f"{what}, not a supported X-ray format (PNG, JPEG, TIFF, BMP or DICOM); convert it to PNG"
    sample = head[:64]
    try:
        text = sample.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c in "\r\n\t" for c in text):
        # Never quote the content: the reason may be shown to whoever named the file (e.g. /etc/passwd).
        return "this is a text file, not an image"
    if len(head) >= 4 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[2:4] in (b"\x00\x00", b"\x05\x00", b"\x16\x00"):
        return ("looks like a DICOM data set without the 128-byte preamble and 'DICM' marker; "
                "re-save it as a DICOM Part 10 file (e.g. `dcmconv`)")
    # No bytes are shown: even a few bytes of an arbitrary binary file can be a secret (`file` tells more).
    return ("unrecognised file format: its first bytes match none of the supported formats "
            "(PNG, JPEG, TIFF, BMP, DICOM; detected by content, not extension)")


# ---------------------------------------------------------------------------- reading a file's bytes

_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device (a disk)"),
    (stat.S_ISSOCK, "a socket"),
)


def _fs_path(path) -> str:
    """``path`` (str, bytes or PathLike) as a str; undecodable bytes survive as surrogate escapes."""
    path = os.fspath(path)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def read_file_bytes(path: str | bytes | os.PathLike, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The content of the regular file at ``path``, read safely; :class:`ImageReadError` otherwise.

    The one way covidcxr reads an input file's bytes (the reader, the working-size cache, batch
    prediction). Before anything is opened, ``os.stat`` decides what the path is:

    * missing -> "file not found"; a symbolic link that points (directly or via other links) back to
      itself -> "symlink loop"; a link to nothing -> "broken symbolic link to <target>";
    * a folder -> "is a folder"; a FIFO, socket or character / block device (``/dev/zero``, also via
      a link) -> refused by name, never opened, so a FIFO cannot make the reader hang;
    * larger than ``max_bytes`` (default :data:`DEFAULT_MAX_FILE_BYTES`, 1 GiB) -> refused without
      being read; a file that grows past the limit while it is read is refused as well;
    * permission and other OS errors -> "cannot read file: <the OS reason>".

    The file is opened non-blocking and checked again on the open descriptor, so a path swapped for a
    FIFO between the check and the open is refused too.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes!r}: must be a positive integer")
    max_bytes = int(max_bytes)
    fspath = _fs_path(path)
    name = fspath
    if fspath == "":
        raise ImageReadError(name, "empty path, no file named")
    try:
        st = os.stat(fspath)  # follows symbolic links
    except OSError as exc:
        raise ImageReadError(name, _describe_stat_error(fspath, exc)) from None
    via = ""
    if os.path.islink(fspath):
        try:
            via = f" (via a symbolic link to {os.readlink(fspath)})"
        except OSError:
            via = " (via a symbolic link)"
    _check_regular(name, st, via, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(fspath, flags)
    except OSError as exc:
        raise ImageReadError(name, _describe_stat_error(fspath, exc)) from None
    try:
        _check_regular(name, os.fstat(fd), via, max_bytes)  # the file that was opened, not the one stat saw
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ImageReadError(name, f"file grew past max_bytes={max_bytes:,} while being read; refused")
        return b"".join(chunks)
    except OSError as exc:
        raise ImageReadError(name, f"cannot read file: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)


def _check_regular(name, st: os.stat_result, via: str, max_bytes: int) -> None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise ImageReadError(name, f"is a folder, not an image file{via}")
    if not stat.S_ISREG(mode):
        what = next((label for test, label in _SPECIAL_FILES if test(mode)), "a special file")
        raise ImageReadError(name, f"is {what}, not a regular file{via}; refused without opening it")
    if st.st_size > max_bytes:
        raise ImageReadError(
            name, f"file is {st.st_size:,} bytes, larger than max_bytes={max_bytes:,}; refused without reading it "
                  "(pass a larger max_bytes if the file is trusted)")


def _describe_stat_error(fspath: str, exc: OSError) -> str:
    code = exc.errno
    if code == errno.ELOOP:
        return ("symlink loop: a symbolic link on this path points back to itself (directly or through other "
                "links), there is no file to read")
    if code == errno.ENOENT:
        if os.path.islink(fspath):
            try:
                target = os.readlink(fspath)
            except OSError:
                target = "a missing file"
            return f"broken symbolic link to {target} (the target does not exist)"
        return "file not found"
    if code == errno.ENOTDIR:
        return "file not found (a part of the path is a file, not a folder)"
    if code == errno.ENAMETOOLONG:
        return "file name too long"
    if code in (errno.EACCES, errno.EPERM):
        return f"cannot read file: {exc.strerror or 'permission denied'}"
    return f"cannot read file: {exc.strerror or type(exc).__name__}"


# ---------------------------------------------------------------------------- public API


def read_xray(path: str | bytes | os.PathLike, *, allow_non_frontal: bool = False,
              max_pixels: int = DEFAULT_MAX_PIXELS, checks: InputChecks | None = DEFAULT_CHECKS,
              max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> XRay:
    """Read a chest radiograph from ``path`` (PNG, JPEG, TIFF, BMP, or DICOM of any extension).

    Raises :class:`ImageReadError` naming the file and the reason for anything that cannot be read
    (the file itself is read with :func:`read_file_bytes`, so FIFOs, devices, symlink loops and files
    over ``max_bytes`` are refused before reading), :class:`NotAChestXRayError` for a DICOM that says
    it is not a frontal chest radiograph (CT, MR, lateral, ...) unless ``allow_non_frontal=True``,
    and :class:`~covidcxr.errors.ImplausibleImageError` for an image the plausibility gate ``checks``
    refuses (:class:`~covidcxr.data.plausibility.InputChecks`; ``None`` = no plausibility checks).
    """
    _check_arguments(max_pixels, checks)
    name = _fs_path(path)
    data = read_file_bytes(name, max_bytes=max_bytes)
    return decode_xray(data, name, allow_non_frontal=allow_non_frontal, max_pixels=max_pixels, checks=checks)


def decode_xray(data: bytes, name: str | bytes | os.PathLike = "<bytes>", *, allow_non_frontal: bool = False,
                max_pixels: int = DEFAULT_MAX_PIXELS, checks: InputChecks | None = DEFAULT_CHECKS) -> XRay:
    """Decode an X-ray from the bytes of a file (e.g. an upload); ``name`` is used in error messages.

    Same rules and result as :func:`read_xray`; the working-size cache uses it so that the bytes it
    hashes are exactly the bytes it decodes. Whatever goes wrong inside the decoders ends as an
    :class:`ImageReadError` (a bad *argument*, e.g. ``max_pixels=0``, is a ``ValueError``).
    """
    _check_arguments(max_pixels, checks)
    name = _fs_path(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    try:
        xray = _decode(data, name, allow_non_frontal=allow_non_frontal, max_pixels=int(max_pixels))
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(name, "not enough memory to decode this image") from None
    except Exception as exc:  # the final guard: no library exception type ever escapes the reader
        log.debug("unexpected error decoding %s", name, exc_info=True)
        raise ImageReadError(
            name, f"unexpected error while decoding ({type(exc).__name__}: {_exc_text(exc)}); the file is "
                  "corrupt or uses a feature covidcxr does not support") from None
    if checks is not None:
        check_plausible(xray.pixels, name, checks)
    return xray


def _check_arguments(max_pixels, checks) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels={max_pixels!r}: must be a positive integer")
    if checks is not None and not isinstance(checks, InputChecks):
        raise TypeError(f"checks={checks!r}: must be an InputChecks or None")


def _decode(data: bytes, name: str, *, allow_non_frontal: bool, max_pixels: int) -> XRay:
    if len(data) == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    head = bytes(data[:HEAD_BYTES])
    fmt = sniff_format(head)
    try:
        if fmt is None:
            raise ImageReadError(name, _describe_unknown(head))
        xray = _READERS[fmt](data, name, fmt=fmt, allow_non_frontal=allow_non_frontal, max_pixels=max_pixels)
    except ImageReadError as exc:
        # A DICOM cut off inside or right after its 128-byte preamble has no 'DICM' marker (or
        # nothing after it); its preamble may look like a TIFF header (dual-personality files).
        if fmt != "dicom" and 128 <= len(data) < 132 and b"DICM".startswith(bytes(data[128:])):
            raise ImageReadError(
                name, f"truncated DICOM file: only {len(data)} bytes, the size of a DICOM preamble, with "
                      f"nothing after it (not a valid {fmt.upper() if fmt else 'image'} file either)") from None
        raise
    pixels = np.ascontiguousarray(np.clip(xray.pixels, 0.0, 1.0), dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ImageReadError(name, f"decoded to an array of shape {pixels.shape}, not a 2-D image")
    if not np.isfinite(pixels).all():
        raise ImageReadError(name, "decoded pixels contain NaN or infinity")
    xray.pixels = pixels
    xray.meta.setdefault("original_shape", tuple(int(v) for v in pixels.shape))
    xray.meta["reader_version"] = READER_VERSION
    return xray


def _exc_text(exc: BaseException, limit: int = 160) -> str:
    """A library exception's message for a reason: one line, capped, without object reprs."""
    import re

    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
