"""cprop's file format: a NumPy .npz archive, never pickled, written atomically.

An archive holds
  ``__cprop__``  a JSON document (UTF-8 bytes in a uint8 array): ``{"format": "cprop",
                 "version": 1, "kind": "network" | "trainer", ...}`` with the architecture
                 (layer sizes, activations, dtype) and, for a trainer, the loss, optimizer,
                 epoch count, random state and history;
  ``params``     the flat parameter array, laid out W0 b0 W1 b1 … (row-major W);
  ``state_<i>``  for a trainer, the optimizer's state arrays (momentum, Adam moments).

Loading reads with ``allow_pickle=False`` and checks every field, so a
truncated, corrupted or foreign file raises :class:`CpropFileError` and nothing
in it is ever executed.
"""
import io
import json
import os
import secrets
import stat
import zipfile

import numpy as np

FORMAT = "cprop"
VERSION = 1
META_KEY = "__cprop__"


class CpropFileError(ValueError):
    """A file that is not a valid cprop archive (truncated, corrupted, foreign or too new)."""


# -- writing ------------------------------------------------------------------------------


def save_archive(path, meta, arrays):
    """Write meta and arrays to `path` atomically.

    The data go to a temporary file in the target's directory, are flushed to
    disk, and the file is renamed over the target, so a crash or a full disk
    midway leaves any previous file untouched and no temporary file behind.
    As with any file a program writes: a new file gets the mode the umask
    allows (0666 & ~umask), an existing file keeps its mode, and a symbolic
    link is written through (its target is replaced, the link stays).

    Raises
    ------
    ValueError — `path` is empty.
    IsADirectoryError — `path` names a directory.
    FileNotFoundError — the directory does not exist.
    """
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError("cannot save to an empty path; give a file name")
    if path.endswith((os.sep, os.altsep or os.sep)):
        raise IsADirectoryError(f"cannot save to {path!r}: it names a directory, give a file name")
    target = os.path.realpath(path)          # through any symbolic links, to the file they name
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        mode = None
    else:
        if stat.S_ISDIR(existing.st_mode):
            raise IsADirectoryError(f"cannot save to {path!r}: it is a directory, give a file name")
        if not stat.S_ISREG(existing.st_mode):
            raise CpropFileError(f"cannot save to {path!r}: {target!r} exists and is not a regular file")
        mode = stat.S_IMODE(existing.st_mode)

    members = {name: np.ascontiguousarray(arr) for name, arr in arrays.items()}
    meta = dict(meta, format=FORMAT, version=VERSION,
                members={k: {"dtype": a.dtype.name, "shape": list(a.shape)} for k, a in members.items()})
    payload = {META_KEY: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8), **members}

    fd, tmp = _create_temporary(directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = None                        # the file object owns it now
            if mode is not None:             # an existing file keeps its mode
                _set_mode(f.fileno(), tmp, mode)
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _set_mode(fd, path, mode):
    """On the descriptor where the OS allows: a path could be swapped for a symlink meanwhile."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:
        os.chmod(path, mode)


def _create_temporary(directory):
    """(fd, path) of a new, empty file in `directory`. Created with mode 0666, which
    the kernel narrows by the umask, as for any new file (mkstemp would give 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".cprop-{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory!r}")


def _fsync_directory(directory):
    """Make the rename itself durable; some file systems cannot, which costs only durability."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_archive(path, kind=None):
    """(meta, arrays) from a cprop archive; CpropFileError unless it is a valid one."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"PK"):
        raise CpropFileError(f"{path!r} is not a cprop file (not an .npz archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as exc:
        raise CpropFileError(f"{path!r} is not a readable cprop file ({type(exc).__name__}: {exc})") from None
    if META_KEY not in arrays:
        raise CpropFileError(f"{path!r} is not a cprop file (no {META_KEY!r} entry)")
    raw = arrays.pop(META_KEY)
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CpropFileError(f"{path!r}: its {META_KEY!r} entry is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CpropFileError(f"{path!r} is not a cprop file")
    if meta.get("version") != VERSION:
        raise CpropFileError(f"{path!r} has format version {meta.get('version')!r}; this cprop reads version {VERSION}")
    if kind is not None and meta.get("kind") not in kind:
        raise CpropFileError(f"{path!r} holds a {meta.get('kind')!r}, expected one of {kind}")
    return meta, arrays
