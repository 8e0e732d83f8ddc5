"""Inputs of ``covidcxr predict``: files, folders, globs and archives -> the files to predict and the skips.

Every input named or found ends in exactly one place: ``Inputs.files`` (offered to the model),
``Inputs.missing`` (cannot be read: ``(name, reason)``) or ``Inputs.ignored`` (found in a folder or
archive but not an image by its extension: ``(name, reason)``). Nothing is dropped silently.

* Names are reported with :func:`display_name`: bytes that are not UTF-8 (``b"bad\\xff.png"``) are
  written as ``bad\\xff.png`` (backslash escapes), so every name can go to CSV, JSON and the console.
* Folder entries are classified with ``os.stat`` before anything is opened (:func:`entry_problem`):
  FIFOs, sockets, devices (``/dev/zero``, also behind a link), symlink loops and dangling links are
  skipped with their reason; links to folders inside a walked folder are reported, not followed.
* Archive members are extracted under generated names into the job's private temporary folder
  (:func:`extraction_folder`), with a per-member cap and a cap on the total bytes unpacked per job.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import socket
import stat
import tarfile
import tempfile
import threading
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from covidcxr.data.io import read_file_bytes
from covidcxr.errors import ConfigError, CovidCXRError
from covidcxr.files import dumps_json

#: Extensions offered to the model when walking a folder. Files named explicitly are always tried;
#: extension-less files are included because DICOM files often have no extension.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ".tif", ".tiff", ".bmp", ""})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
#: Largest archive member extracted (uncompressed), against zip bombs.
MAX_MEMBER_BYTES = 512 * 1024 * 1024
#: Most bytes unpacked from all the archives of one job together (the temporary folder's size).
MAX_ARCHIVE_BYTES = 4 * 1024**3
ARCHIVE_SEPARATOR = "::"
#: Temporary folders holding unpacked members: ``covidcxr-predict-<pid>-<random>``.
TEMP_PREFIX = "covidcxr-predict-"
OWNER_FILE = "owner.json"

_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device (a disk)"), (stat.S_ISSOCK, "a socket"))


def display_name(path: str | bytes | os.PathLike) -> str:
    """``path`` as text that every output can hold: undecodable bytes become ``\\xNN`` escapes."""
    text = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def entry_problem(path: str | os.PathLike) -> str | None:
    """Why the entry at ``path`` is not a file to read (decided by ``os.stat``, nothing is opened);
    None for a regular file or a folder."""
    path = os.fspath(path)
    try:
        st = os.stat(path)  # follows links
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ("symlink loop: a symbolic link on this path points back to itself (directly or through "
                    "other links); there is no file to read")
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return f"dangling link: broken symbolic link to {_link_target(path)} (the target does not exist)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "file not found"
        return f"cannot read file: {exc.strerror or type(exc).__name__}"
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    kind = next((label for test, label in _SPECIAL if test(st.st_mode)), "a special file")
    via = f" (via a symbolic link to {_link_target(path)})" if os.path.islink(path) else ""
    return f"is {kind}, not a regular file{via}; refused without opening it"


def _link_target(path: str) -> str:
    try:
        return display_name(os.readlink(path))
    except OSError:
        return "an unreadable target"


@dataclass
class Inputs:
    """Image files to predict (``files``) with the name to report for each, and every input skipped."""

    files: list[Path] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # extracted temp path -> "archive::member"
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): not an image by extension
    missing: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): cannot be read / found
    unpacked_bytes: int = 0  # bytes extracted from archives so far

    def name(self, path: str | Path) -> str:
        return self.names.get(str(path)) or display_name(str(path))

    def skip(self, path, reason: str) -> None:
        self.missing.append((display_name(path), display_name(reason)))

    def ignore(self, path, reason: str) -> None:
        self.ignored.append((display_name(path), display_name(reason)))


def _is_archive_name(path: str | Path) -> bool:
    name = os.fspath(path).lower()
    return any(name.endswith(s) for s in ARCHIVE_SUFFIXES)


def _extension_reason(suffix: str) -> str:
    known = ", ".join(sorted(s for s in IMAGE_SUFFIXES if s))
    return (f"not an image file extension ({suffix}); in folders and archives only {known} and extension-less "
            "files are offered to the model (name the file to try it anyway)")


def _extract_archive(archive: Path, into: Path, inputs: Inputs, max_archive_bytes: int) -> None:
    """Extract image members under ``into`` with generated names (no path traversal), remembering their names."""
    target = Path(tempfile.mkdtemp(dir=into, prefix="archive-"))
    shown = display_name(archive)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = [(m.filename, m.file_size, lambda m=m: zf.open(m)) for m in zf.infolist() if not m.is_dir()]
                _extract_members(shown, members, target, inputs, max_archive_bytes)
        else:
            with tarfile.open(archive) as tf:
                members = []
                for m in tf.getmembers():
                    if m.isfile():
                        members.append((m.name, m.size, lambda m=m: tf.extractfile(m)))
                    elif not m.isdir():  # links and devices are never followed; say so instead of dropping them
                        kind = "link" if (m.issym() or m.islnk()) else "special file"
                        inputs.skip(f"{shown}{ARCHIVE_SEPARATOR}{m.name}",
                                    f"archive member is a {kind}, not a regular file; not extracted")
                _extract_members(shown, members, target, inputs, max_archive_bytes)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        inputs.skip(archive, f"cannot read archive ({exc.__class__.__name__}: {exc})")


def _copy_limited(src, dst, limit: int) -> int:
    """Copy at most ``limit`` bytes; raise ValueError when ``src`` holds more."""
    total = 0
    while chunk := src.read(min(1 << 20, limit + 1 - total)):
        total += len(chunk)
        if total > limit:
            raise ValueError(f"member holds more than the {limit:,} bytes allowed")
        dst.write(chunk)
    return total


def _extract_members(shown: str, members, target: Path, inputs: Inputs, max_archive_bytes: int) -> None:
    for i, (member, size, open_member) in enumerate(sorted(members, key=lambda m: m[0])):
        display = display_name(f"{shown}{ARCHIVE_SEPARATOR}{member}")
        suffix = Path(member).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            inputs.ignore(display, _extension_reason(suffix))
            continue
        if size > MAX_MEMBER_BYTES:
            inputs.skip(display, f"archive member of {size:,} bytes exceeds the {MAX_MEMBER_BYTES:,} byte limit")
            continue
        room = max_archive_bytes - inputs.unpacked_bytes
        if size > room:
            inputs.skip(display, f"archive expansion cap: {size:,} more bytes would take this job's unpacked archive "
                                 f"members past max_archive_bytes={max_archive_bytes:,} ({inputs.unpacked_bytes:,} "
                                 "used); not extracted")
            continue
        dest = target / f"{i:07d}{suffix}"
        try:
            with open_member() as src, open(dest, "wb") as dst:
                inputs.unpacked_bytes += _copy_limited(src, dst, min(room, MAX_MEMBER_BYTES, max(size, 0)))
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, RuntimeError, NotImplementedError,
                OSError, ValueError) as exc:  # a damaged, encrypted or lying member: skip it, extract the rest
            dest.unlink(missing_ok=True)
            inputs.skip(display, f"cannot extract archive member ({exc.__class__.__name__}: {exc})")
            continue
        inputs.files.append(dest)
        inputs.names[str(dest)] = display


def _walk(folder: str, inputs: Inputs, add, extract_dir: Path | None, max_archive_bytes: int) -> None:
    """Every entry under ``folder`` (sorted by path; links to folders reported, not followed)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=lambda e: inputs.skip(
            e.filename or folder, f"cannot list folder: {e.strerror or type(e).__name__}")):
        if not dirnames and not filenames:
            inputs.skip(dirpath, "is a folder with nothing in it (no file to predict)")
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                dirnames.remove(d)
                found.append(os.path.join(dirpath, d))
        found.extend(os.path.join(dirpath, f) for f in filenames)
    for child in sorted(found):
        name = os.path.basename(child)
        if os.path.isdir(child):  # a link to a folder (os.walk does not follow links)
            inputs.skip(child, "symbolic link to a folder inside a walked folder; not followed "
                               "(name it on the command line to include it)")
        elif name.startswith("."):
            inputs.ignore(child, "hidden file (name starts with '.'); not offered to the model")
        elif _is_archive_name(name) and extract_dir is not None:
            problem = entry_problem(child)
            if problem:
                inputs.skip(child, problem)
            else:
                _extract_archive(Path(child), extract_dir, inputs, max_archive_bytes)
        elif (suffix := Path(name).suffix.lower()) not in IMAGE_SUFFIXES:
            inputs.ignore(child, _extension_reason(suffix))
        else:
            add(child)


def collect_inputs(paths: Sequence[str | Path], extract_dir: Path | None = None, *,
                   max_archive_bytes: int = MAX_ARCHIVE_BYTES) -> Inputs:
    """Expand files, folders (recursive), globs and archives into image files, in a stable order.

    Archives are extracted under ``extract_dir`` (required when an archive is given), at most
    ``max_archive_bytes`` in total. Inputs that cannot be read are listed in ``Inputs.missing``,
    folder / archive files without an image extension in ``Inputs.ignored``, each with its reason.
    """
    if isinstance(max_archive_bytes, bool) or not isinstance(max_archive_bytes, int) or max_archive_bytes < 0:
        raise ConfigError(f"max_archive_bytes={max_archive_bytes!r}: must be a non-negative integer")
    inputs = Inputs()
    seen: set[str] = set()

    def add(p: str) -> None:
        if p in seen:
            return
        seen.add(p)
        problem = entry_problem(p)
        if problem:
            inputs.skip(p, problem)
        else:
            inputs.files.append(Path(p))

    for raw in paths:
        raw = os.fsdecode(raw) if isinstance(raw, bytes) else str(raw)
        candidates = [raw] if os.path.lexists(raw) else sorted(glob.glob(raw, recursive=True))
        if not candidates:
            inputs.skip(raw, "no such file, folder or glob match")
        for path in candidates:
            if os.path.isdir(path):
                _walk(path, inputs, add, extract_dir, max_archive_bytes)
            elif _is_archive_name(path) and entry_problem(path) is None:
                if extract_dir is None:
                    raise ConfigError(f"{display_name(path)}: archives need an extraction folder")
                _extract_archive(Path(path), extract_dir, inputs, max_archive_bytes)
            else:
                add(path)
    return inputs


# ---------------------------------------------------------------------------- the temporary folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: someone else's live process
        return True
    return True


def remove_stale_folders(parent: str | Path | None = None) -> list[Path]:
    """Remove ``covidcxr-predict-<pid>-*`` folders (of this user, on this host) whose process is dead."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    removed = []
    for entry in sorted(parent.glob(TEMP_PREFIX + "*")):
        pid_text = entry.name[len(TEMP_PREFIX):].split("-", 1)[0]
        try:
            st = entry.lstat()
            if not pid_text.isdigit() or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            pid, host = int(pid_text), socket.gethostname()
            marker = entry / OWNER_FILE
            if marker.exists():
                owner = json.loads(read_file_bytes(marker, max_bytes=4096))
                pid, host = int(owner.get("pid", pid)), str(owner.get("host", host))
        except (OSError, ValueError, TypeError, AttributeError, CovidCXRError):
            continue
        if pid != os.getpid() and host == socket.gethostname() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler: unwinds the job (journals closed, temporary folder removed)."""


@contextmanager
def _terminate_on_sigterm(cleaning: threading.Event) -> Iterator[None]:
    """Turn SIGTERM into an exception (exit status 143) while the block runs; the old handler is restored.

    A Python handler that was installed before is called first (it may end the job itself); one
    that returns lets the job go on. Where SIGTERM was ignored, or off the main thread, nothing is
    installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return

    def on_sigterm(signum, frame):
        if callable(previous):
            previous(signum, frame)
            return
        if not cleaning.is_set():
            raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def extraction_folder(parent: str | Path | None = None) -> Iterator[Path]:
    """A private ``covidcxr-predict-<pid>-*`` folder for unpacked archive members, removed on normal
    exit, on exceptions and on SIGTERM; stale folders of dead processes (kill -9) are removed first."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    remove_stale_folders(parent)
    cleaning = threading.Event()
    with _terminate_on_sigterm(cleaning):
        folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent))
        try:
            (folder / OWNER_FILE).write_text(dumps_json({"pid": os.getpid(), "host": socket.gethostname()}))
            yield folder
        finally:
            cleaning.set()  # a second SIGTERM must not interrupt the clean-up
            shutil.rmtree(folder, ignore_errors=True)
