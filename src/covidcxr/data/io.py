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
import logging
import os
import stat
from typing import Callable

import numpy as np

from covidcxr.data.decoded import DEFAULT_MAX_PIXELS, LUMA_WEIGHTS, XRay, _exc_text  # noqa: F401 (re-exported)
from covidcxr.data.dicom_reader import (NON_CHEST_BODY_PARTS, NON_FRONTAL_VIEWS,  # noqa: F401 (re-exported)
                                        RADIOGRAPH_MODALITIES, _read_dicom)
from covidcxr.data.pillow_reader import _read_pil
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
