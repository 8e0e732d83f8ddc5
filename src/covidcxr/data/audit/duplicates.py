"""Near-duplicate search: 256-bit perceptual hashes (cached by file content), vectorised Hamming
pair search, and the ``near_duplicate`` finding."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from covidcxr.data.audit.report import Finding
from covidcxr.data.importers.base import read_image_bytes, reason_without_content
from covidcxr.data.manifest import Manifest
from covidcxr.errors import CovidCXRError, ImageReadError

HASH_SIZE = 16  # 16 x 16 = 256-bit pHash, as the shared data README uses
HASH_VERSION = "phash16-v1"  # bump when the decoding / hashing below changes
DEFAULT_MAX_DISTANCE = 24
_JPEG_MAGIC = b"\xff\xd8\xff"


def _decode_for_hash(data: bytes, name: str):
    """Bytes -> 8-bit grey PIL image for hashing. The one decoding entry point of the audit.

    JPEGs use Pillow's draft mode (DCT-domain downscaling to >= 128 px): pHash only looks at a 64 x 64
    version, and it is ~5x faster than a full decode. Everything else goes through ``decode_xray``
    (DICOM, 16-bit PNG, ... handled like everywhere else in covidcxr).
    """
    from PIL import Image, ImageOps

    if data[:3] == _JPEG_MAGIC:
        try:
            img = Image.open(io.BytesIO(data))
            img.draft("L", (4 * HASH_SIZE * 2, 4 * HASH_SIZE * 2))
            img = ImageOps.exif_transpose(img).convert("L")
            img.load()
            return img
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageReadError(name, f"corrupt JPEG: {exc}") from None
    from covidcxr.data.io import decode_xray

    pixels = decode_xray(data, name, allow_non_frontal=True).pixels
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")


def _phash_bytes(data: bytes, name: str) -> bytes:
    import imagehash

    h = imagehash.phash(_decode_for_hash(data, name), hash_size=HASH_SIZE)
    return np.packbits(h.hash.flatten()).tobytes()


class HashCache:
    """pHash per file content (SHA-256 of the bytes) in a small SQLite file under the covidcxr cache."""

    def __init__(self, folder: Path | None = None):
        from covidcxr.paths import cache_dir

        folder = Path(folder) if folder is not None else cache_dir() / "phash"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{HASH_VERSION}.sqlite"
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS phash (sha256 TEXT PRIMARY KEY, hash BLOB NOT NULL)")

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        keys = list(keys)
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self._db.execute(f"SELECT sha256, hash FROM phash WHERE sha256 IN ({','.join('?' * len(chunk))})", chunk)
            out.update({k: bytes(v) for k, v in rows})
        return out

    def put_many(self, items: dict[str, bytes]) -> None:
        if items:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO phash VALUES (?, ?)", list(items.items()))

    def close(self) -> None:
        self._db.close()


def perceptual_hashes(paths: Sequence[Path], *, use_cache: bool = True, progress: bool = True,
                      chunk: int = 256) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """256-bit pHashes of ``paths``: ``(hashes uint8 (N, 32), ok bool (N,), unreadable)``.

    Files are read in chunks (memory stays ~``chunk`` files, whatever the data set size); each file's
    SHA-256 is looked up in the cache and only unknown contents are decoded. Unreadable or missing
    files get ``ok=False`` and a ``{"image", "reason"}`` entry; the rest go on.
    """
    from covidcxr.progress import make_progress

    n = len(paths)
    hashes = np.zeros((n, HASH_SIZE * HASH_SIZE // 8), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    unreadable: list[dict] = []
    cache = HashCache() if use_cache else None
    try:
        with make_progress(disable=not progress) as bar:
            task = bar.add_task("hashing images", total=n)
            for start in range(0, n, chunk):
                contents: dict[int, tuple[str, bytes]] = {}
                for i in range(start, min(start + chunk, n)):
                    try:
                        data = read_image_bytes(paths[i])  # folders, FIFOs, devices are refused unopened
                    except CovidCXRError as exc:
                        unreadable.append({"image": str(paths[i]),
                                           "reason": reason_without_content(getattr(exc, "reason", str(exc)))})
                        continue
                    contents[i] = (hashlib.sha256(data).hexdigest(), data)
                known = cache.get_many([k for k, _ in contents.values()]) if cache else {}
                new: dict[str, bytes] = {}
                for i, (key, data) in contents.items():
                    h = known.get(key) or new.get(key)
                    if h is None:
                        try:
                            h = new[key] = _phash_bytes(data, str(paths[i]))
                        except CovidCXRError as exc:
                            unreadable.append({"image": str(paths[i]),
                                               "reason": reason_without_content(getattr(exc, "reason", str(exc)))})
                            continue
                    hashes[i] = np.frombuffer(h, dtype=np.uint8)
                    ok[i] = True
                if cache:
                    cache.put_many(new)
                bar.advance(task, min(start + chunk, n) - start)
    finally:
        if cache:
            cache.close()
    return hashes, ok, unreadable


def hamming_pairs(hashes: np.ndarray, max_distance: int, block: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of packed hashes within ``max_distance`` bits: ``(i, j, distance)``.

    Vectorised: XOR of 64-bit words and ``np.bitwise_count`` over blocks of rows. The default block
    keeps the temporary (block x N x words) array near 64 MB whatever N is.
    """
    words = np.ascontiguousarray(hashes).view(np.uint64)
    n = len(words)
    if block is None:
        block = int(max(1, min(256, (64 << 20) // max(1, n * words.shape[1] * 8))))
    found_i, found_j, found_d = [], [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        dist = np.bitwise_count(words[start:stop, None, :] ^ words[None, :, :]).sum(axis=2, dtype=np.int32)
        rows, cols = np.nonzero(dist <= max_distance)
        rows = rows + start
        keep = cols > rows
        found_i.append(rows[keep])
        found_j.append(cols[keep])
        found_d.append(dist[rows[keep] - start, cols[keep]])
    return (np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)) if found_i else \
        (np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.int32))


def find_near_duplicates(manifest: Manifest, *, max_distance: int = DEFAULT_MAX_DISTANCE, use_cache: bool = True,
                         progress: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """Near-duplicate pairs (pHash distance <= ``max_distance``) with their splits, sources, patients."""
    table = manifest.table
    hashes, ok, unreadable = perceptual_hashes(manifest.image_paths(), use_cache=use_cache, progress=progress)
    idx = np.flatnonzero(ok)
    i, j, d = hamming_pairs(hashes[idx], max_distance)
    a, b = table.iloc[idx[i]], table.iloc[idx[j]]
    pairs = pd.DataFrame({
        "distance": d.astype(int),
        "image_a": a["image"].to_numpy(), "image_b": b["image"].to_numpy(),
        "split_a": a["split"].to_numpy(), "split_b": b["split"].to_numpy(),
        "source_a": a["source"].to_numpy(), "source_b": b["source"].to_numpy(),
        "patient_a": a["patient_id"].to_numpy(), "patient_b": b["patient_id"].to_numpy(),
        "label_a": a["label"].to_numpy(), "label_b": b["label"].to_numpy(),
    })
    cross_split = (pairs["split_a"] != pairs["split_b"]) & (pairs["split_a"] != "") & (pairs["split_b"] != "")
    cross_source = pairs["source_a"] != pairs["source_b"]
    pairs["kind"] = np.where(cross_split, "cross-split", np.where(cross_source, "cross-source", "within"))
    pairs["same_patient"] = pairs["patient_a"] == pairs["patient_b"]
    order = pairs["kind"].map({"cross-split": 0, "cross-source": 1, "within": 2})
    pairs = pairs.assign(_o=order).sort_values(["_o", "distance"], kind="stable").drop(columns="_o").reset_index(drop=True)
    return pairs, unreadable


def check_near_duplicates(pairs: pd.DataFrame, *, strict: bool, max_distance: int) -> list[Finding]:
    out = []
    severity = "error" if strict else "warning"
    for kind, what in (("cross-split", "across splits (test images the model has effectively seen)"),
                       ("cross-source", "across sources (the same image under two sources)")):
        sel = pairs[pairs["kind"] == kind]
        if len(sel):
            ex = sel.iloc[0]
            out.append(Finding("near_duplicate", severity,
                               f"{len(sel)} near-duplicate pair(s) {what}, pHash distance <= {max_distance}; closest: "
                               f"{ex['image_a']} ({ex['split_a'] or '-'}) ~ {ex['image_b']} ({ex['split_b'] or '-'}) "
                               f"at {ex['distance']}; {int((~sel['same_patient']).sum())} pair(s) have different "
                               f"patient ids - merge the ids or drop one image",
                               {"kind": kind, "pairs": int(len(sel)), "different_patients": int((~sel["same_patient"]).sum())}))
    within = int((pairs["kind"] == "within").sum())
    if within:
        out.append(Finding("near_duplicate", "info",
                           f"{within} near-duplicate pair(s) inside one split and source (serial studies / copies)",
                           {"kind": "within", "pairs": within}))
    if not len(pairs):
        out.append(Finding("near_duplicate", "info", f"no image pair within pHash distance {max_distance}", {"pairs": 0}))
    return out
