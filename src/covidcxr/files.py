"""Writing files safely: atomic replace, JSON with numpy values. No heavy imports (no torch)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

# Read once at import: os.umask() can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write via a temporary file + rename so a killed process never leaves half a file.

    ``fsync=False`` keeps the atomicity but skips forcing the data to disk (for caches that verify
    their entries anyway; the fsync dominates writing many small files).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n").encode())


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    # Paths, dates and DICOM value types are written as their text form.
    return str(o)
