"""The working-size cache: decode every X-ray once, keep it small, reuse it everywhere.

Training reads each image once per epoch; decoding a 4000 px JPEG or a JPEG 2000 DICOM every time
would dominate the run. :class:`WorkingSizeCache` decodes a file with
:func:`~covidcxr.data.io.read_xray`, shrinks it so the longer side is at most ``working_size``
(aspect ratio kept, ``cv2.INTER_AREA``, never enlarged: the pipeline's first stage,
:func:`covidcxr.data.preprocess.working_image`) and stores it as uint16 (so 12-16 bit DICOM
detail survives; 1/65535 quantisation). Later loads of the same content return the stored array.

Correctness rules:

* An entry is keyed by the SHA-256 of the file's *content* plus every setting that changes the
  pixels (working size, reader version, resize method, cache format), so an edited file, a new
  reader or another working size never gets a stale entry. Renamed or copied files share entries.
* Hashing every file on every access would cost as much as decoding it, so a small index maps a
  path's ``(size, mtime_ns, ctime_ns, inode, device)`` to its content hash; any change to the file
  (even one that restores the mtime, which changes ``ctime``) forces a re-hash.
* Entries are written atomically (temporary file + rename), so parallel DataLoader workers or
  processes can share one cache; each entry carries a CRC-32 and its own key, and an entry that
  fails either check is rebuilt, never served.

Entry file layout (``<root>/v2/<key[:2]>/<key>.cxr``): ``MAGIC`` + big-endian uint32 CRC-32 of the
rest + uint32 length of a JSON header + the JSON header (key, settings, shape, dtype, the reader's
``meta``) + the raw little-endian uint16 H x W pixels (read back without a copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from covidcxr import paths
from covidcxr.data.io import DEFAULT_MAX_PIXELS, READER_VERSION, XRay, decode_xray, read_file_bytes
from covidcxr.data.preprocess import dequantise, working_image
from covidcxr.errors import ConfigError, ImageReadError
from covidcxr.progress import make_progress
from covidcxr.files import atomic_write_bytes, json_default

#: Bump when the entry layout or the resize changes; old entries are then simply never looked up.
CACHE_FORMAT = "2"
MAGIC = b"covidcxr-ws\n"
RESIZE_METHOD = "cv2.INTER_AREA"  # covidcxr.data.preprocess.to_working_size
DEFAULT_WORKING_SIZE = 512


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CorruptEntry(Exception):
    """Internal: a cache entry failed its checks and must be rebuilt."""


@dataclass
class CacheStats:
    """What the cache did since it was created (for benchmarks, tests and the CLI summary)."""

    hits: int = 0
    built: int = 0
    rebuilt_corrupt: int = 0
    hashed: int = 0
    errors: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class WorkingSizeCache:
    """Decode-once cache of X-rays at working size.

    ``WorkingSizeCache(root=None, working_size=512).load(path)`` returns a float32 H x W array in
    [0, 1] (bones bright) whose longer side is at most ``working_size``. ``root`` defaults to
    ``covidcxr.paths.cache_dir() / "working-size"`` (``$COVIDCXR_CACHE_DIR``). Safe to share between
    threads and processes. Unreadable files raise :class:`ImageReadError` on every attempt (errors
    are not cached, so a fixed file is picked up).
    """

    def __init__(self, root: str | os.PathLike | None = None, working_size: int = DEFAULT_WORKING_SIZE, *,
                 allow_non_frontal: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS):
        if not isinstance(working_size, (int, np.integer)) or not 16 <= int(working_size) <= 8192:
            raise ConfigError(f"working_size={working_size!r}: must be an integer between 16 and 8192")
        self.root = Path(root) if root is not None else paths.cache_dir() / "working-size"
        self.working_size = int(working_size)
        self.allow_non_frontal = bool(allow_non_frontal)
        self.max_pixels = int(max_pixels)
        self.stats = CacheStats()
        self._memo: dict[str, tuple[tuple, str]] = {}  # resolved path -> (stat signature, content sha256)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Picklable for DataLoader workers started with "spawn": the lock and memo stay behind.
        state = dict(self.__dict__)
        state.pop("_lock"), state.pop("_memo")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._memo, self._lock = {}, threading.Lock()

    def __repr__(self) -> str:
        return f"WorkingSizeCache(root={str(self.root)!r}, working_size={self.working_size})"

    # ------------------------------------------------------------------ public API

    @property
    def settings(self) -> dict:
        """Everything besides the file content that determines the stored pixels (part of the key)."""
        s = {"cache_format": CACHE_FORMAT, "reader_version": READER_VERSION,
             "working_size": self.working_size, "resize": RESIZE_METHOD}
        if self.allow_non_frontal:  # entries of CT / lateral files must not serve a strict cache
            s["allow_non_frontal"] = True
        return s

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """The working-size image of ``path``: float32 H x W in [0, 1], bones bright."""
        return self.load_xray(path).pixels

    def load_xray(self, path: str | os.PathLike) -> XRay:
        """Like :meth:`load`, with the reader's ``meta`` (plus ``content_sha256``, ``working_size``, ``cache``)."""
        stored, meta, _ = self._load(Path(path))
        return XRay(dequantise(stored), meta)

    def load_working(self, path: str | os.PathLike) -> tuple[np.ndarray, dict]:
        """The stored uint16 working image of ``path`` and its ``meta``: the pipeline's first stage,
        bit-identical to :func:`covidcxr.data.preprocess.working_image` of a fresh decode."""
        stored, meta, _ = self._load(Path(path))
        return stored, meta

    def ensure(self, path: str | os.PathLike) -> str:
        """Make sure ``path`` is cached; returns 'hit', 'built' or 'rebuilt' (a corrupt entry was replaced)."""
        return self._load(Path(path))[2]

    def entry_path(self, content_sha256: str) -> Path:
        key = self.key(content_sha256)
        return self.root / f"v{CACHE_FORMAT}" / key[:2] / f"{key}.cxr"

    def key(self, content_sha256: str) -> str:
        blob = json.dumps({"content_sha256": content_sha256, **self.settings}, sort_keys=True)
        return sha256_bytes(blob.encode())

    def content_hash(self, path: str | os.PathLike) -> str:
        """SHA-256 of the file's content, from the index when the file is unchanged since it was hashed."""
        path = Path(path)
        signature = self._signature(path)
        known = self._known_hash(path, signature)
        if known is not None:
            return known
        data = self._read(path)
        digest = sha256_bytes(data)
        self._remember(path, signature, digest)
        return digest

    # ------------------------------------------------------------------ internals

    def _load(self, path: Path) -> tuple[np.ndarray, dict, str]:
        try:
            return self._load_or_build(path)
        except ImageReadError:
            self._count("errors")
            raise

    def _load_or_build(self, path: Path) -> tuple[np.ndarray, dict, str]:
        signature = self._signature(path)
        digest = self._known_hash(path, signature)
        data = None
        if digest is None:
            data = self._read(path)
            digest = sha256_bytes(data)
        entry = self.entry_path(digest)
        status = "built"
        if entry.exists():
            try:
                stored, meta = self._read_entry(entry, digest)
            except CorruptEntry:
                status = "rebuilt"
            else:
                if data is not None:
                    self._remember(path, signature, digest)
                self._count("hits")
                return stored, meta, "hit"
        if data is None:
            data = self._read(path)
            digest_now = sha256_bytes(data)
            if digest_now != digest:  # changed between stat and read: key by what we decode
                digest, entry = digest_now, self.entry_path(digest_now)
        decoded = decode_xray(data, path, allow_non_frontal=self.allow_non_frontal, max_pixels=self.max_pixels)
        stored = working_image(decoded.pixels, self.working_size)
        meta = {**decoded.meta, "content_sha256": digest, "working_size": self.working_size}
        self._write_entry(entry, digest, stored, meta)
        if self._signature(path) == signature:  # do not index a file that changed while we read it
            self._remember(path, signature, digest)
        self._count("rebuilt_corrupt" if status == "rebuilt" else "built")
        return stored, {**meta, "cache": status}, status

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    @staticmethod
    def _read(path: Path) -> bytes:
        # The reader's safe read: no FIFOs, devices or link loops, and a size cap.
        return read_file_bytes(path)

    @staticmethod
    def _signature(path: Path) -> tuple | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def _index_file(self, path: Path) -> Path:
        name = sha256_bytes(str(path.resolve()).encode())
        return self.root / "index" / name[:2] / f"{name}.json"

    def _known_hash(self, path: Path, signature: tuple | None) -> str | None:
        if signature is None:
            return None
        resolved = str(path.resolve())
        memo = self._memo.get(resolved)
        if memo is not None and memo[0] == signature:
            return memo[1]
        try:
            record = json.loads(self._index_file(path).read_text())
        except (OSError, ValueError):
            return None
        if record.get("path") == resolved and tuple(record.get("signature", ())) == signature:
            digest = str(record.get("sha256", ""))
            if len(digest) == 64:
                self._memo[resolved] = (signature, digest)
                return digest
        return None

    def _remember(self, path: Path, signature: tuple | None, digest: str) -> None:
        self._count("hashed")
        if signature is None:
            return
        resolved = str(path.resolve())
        self._memo[resolved] = (signature, digest)
        record = {"path": resolved, "signature": list(signature), "sha256": digest}
        _atomic_write(self._index_file(path), json.dumps(record).encode())  # a torn index record just forces a re-hash

    def _write_entry(self, entry: Path, digest: str, stored: np.ndarray, meta: dict) -> None:
        stored = np.ascontiguousarray(stored, dtype="<u2")
        header = json.dumps({"key": self.key(digest), "settings": self.settings, "shape": list(stored.shape),
                             "dtype": "<u2", "meta": meta}, default=json_default).encode()
        payload = struct.pack(">I", len(header)) + header + stored.tobytes()
        # A cache needs atomicity (readers never see half a file) but not durability: after a
        # crash a torn entry fails its CRC and is rebuilt, so skip the fsync (it tripled cold-pass time).
        _atomic_write(entry, MAGIC + struct.pack(">I", zlib.crc32(payload)) + payload)

    def _read_entry(self, entry: Path, digest: str) -> tuple[np.ndarray, dict]:
        try:
            blob = memoryview(entry.read_bytes())  # slices of a memoryview do not copy the pixels
        except OSError as exc:
            raise CorruptEntry(str(exc)) from None
        head = len(MAGIC) + 4
        if len(blob) < head + 4 or blob[: len(MAGIC)] != MAGIC:
            raise CorruptEntry("bad magic")
        (crc,) = struct.unpack(">I", blob[len(MAGIC) : head])
        payload = blob[head:]
        if zlib.crc32(payload) != crc:
            raise CorruptEntry("CRC mismatch")
        try:
            (header_len,) = struct.unpack(">I", payload[:4])
            header = json.loads(bytes(payload[4 : 4 + header_len]))
            shape = tuple(int(v) for v in header["shape"])
            stored = np.frombuffer(payload[4 + header_len :], dtype=np.dtype(header["dtype"])).reshape(shape)
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            raise CorruptEntry(str(exc)) from None
        if header.get("key") != self.key(digest) or stored.dtype != np.uint16 or stored.ndim != 2 \
                or max(stored.shape) > self.working_size:
            raise CorruptEntry("entry does not match its key")
        meta = header.get("meta", {})
        if "original_shape" in meta:
            meta["original_shape"] = tuple(meta["original_shape"])
        meta["cache"] = "hit"
        return stored, meta


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, fsync=False)


# ---------------------------------------------------------------------------- pre-warming


@dataclass
class WarmReport:
    """What :func:`warm_cache` did: counts, the skipped files with reasons, and the time taken."""

    total: int
    hits: int = 0
    built: int = 0
    rebuilt: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    working_size: int = DEFAULT_WORKING_SIZE
    root: str = ""

    @property
    def images_per_second(self) -> float:
        return (self.total - len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["skipped"] = [{"image": p, "reason": r} for p, r in self.skipped]
        d["images_per_second"] = self.images_per_second
        return d

    def summary(self) -> str:
        """One line, e.g. ``3495 images: 3490 cached (12 already, 3478 decoded), 5 skipped; 41.0 s, 85.2 img/s``."""
        cached = self.hits + self.built + self.rebuilt
        rebuilt = f", {self.rebuilt} corrupt entries rebuilt" if self.rebuilt else ""
        return (f"{self.total} images: {cached} cached ({self.hits} already, {self.built} decoded{rebuilt}), "
                f"{len(self.skipped)} skipped; {self.seconds:.1f} s, {self.images_per_second:.1f} img/s "
                f"at {self.working_size} px in {self.root}")


def warm_cache(image_paths: Iterable[str | os.PathLike], *, working_size: int = DEFAULT_WORKING_SIZE,
               root: str | os.PathLike | None = None, allow_non_frontal: bool = False, workers: int = 1,
               progress: bool = True) -> WarmReport:
    """Decode and store every image; unreadable files are skipped and reported with the reason.

    ``workers`` threads decode in parallel (Pillow, pydicom's codecs and OpenCV release the GIL).
    """
    image_paths = [Path(p) for p in image_paths]
    cache = WorkingSizeCache(root, working_size, allow_non_frontal=allow_non_frontal)
    report = WarmReport(total=len(image_paths), working_size=cache.working_size, root=str(cache.root))

    def ensure(path: Path) -> tuple[Path, str, str | None]:
        try:
            return path, cache.ensure(path), None
        except ImageReadError as exc:
            return path, "skipped", exc.reason

    start = time.perf_counter()
    with make_progress(disable=not progress) as bar, ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        task = bar.add_task(f"caching at {cache.working_size} px", total=len(image_paths))
        for path, status, reason in pool.map(ensure, image_paths):
            if reason is not None:
                report.skipped.append((str(path), reason))
            elif status == "hit":
                report.hits += 1
            elif status == "built":
                report.built += 1
            else:
                report.rebuilt += 1
            bar.advance(task)
    report.seconds = time.perf_counter() - start
    return report


def warm_manifest(manifest_csv: str | os.PathLike, *, working_size: int = DEFAULT_WORKING_SIZE,
                  root: str | os.PathLike | None = None, allow_non_frontal: bool = False, workers: int = 1,
                  progress: bool = True) -> WarmReport:
    """Pre-warm the cache for every image of a manifest (``image`` paths resolve against the CSV's folder)."""
    from covidcxr.data.manifest import Manifest

    paths_ = Manifest.read(manifest_csv).image_paths()
    return warm_cache(paths_, working_size=working_size, root=root, allow_non_frontal=allow_non_frontal,
                      workers=workers, progress=progress)
