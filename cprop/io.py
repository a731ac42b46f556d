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
import tempfile
import zipfile

import numpy as np

FORMAT = "cprop"
VERSION = 1
META_KEY = "__cprop__"


class CpropFileError(ValueError):
    """A file that is not a valid cprop archive (truncated, corrupted, foreign or too new)."""


def save_archive(path, meta, arrays):
    """Write meta and arrays to `path` atomically: a temporary file in the same
    directory, flushed to disk, then renamed over the target. A crash or a full
    disk midway leaves any previous file untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    meta = dict(meta, format=FORMAT, version=VERSION)
    payload = {META_KEY: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    for name, arr in arrays.items():
        payload[name] = np.ascontiguousarray(arr)
    fd, tmp = tempfile.mkstemp(prefix=".cprop-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
