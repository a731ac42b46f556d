"""Data: the bundled UCI handwritten digits, and a reader for MNIST's IDX files."""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from .._validation import check_bool, check_positive_int
from ..io import CpropFileError, open_regular_file

_DATA = os.path.join(os.path.dirname(__file__), "data")


def load_digits(scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten-digits set: 1,797 8×8 images, classes 0-9 (CC BY 4.0, bundled).

    Returns
    -------
    X : float32 array (1797, 64) — pixel counts 0..16, divided by 16 when `scale`
    y : int64 array (1797,) — the digit
    """
    scale = check_bool(scale, "scale")
    with gzip.open(os.path.join(_DATA, "digits.csv.gz"), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    X, y = data[:, :-1], data[:, -1].astype(np.int64)
    if scale:
        X = X / np.float32(16.0)
    return np.ascontiguousarray(X), y


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MAX_IDX_BYTES = 1 << 30     # 20x MNIST's training images; read_idx(max_bytes=...) reads larger files
_CHUNK = 1 << 22


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """An array from an IDX file (MNIST's format), gzipped or not.

    The header's dimensions fix the data's size; exactly that many bytes are
    read (or decompressed), never more, and a file with fewer or more is refused.

    Parameters
    ----------
    path : str or os.PathLike — a regular file
    max_bytes : int — refuse a file whose header declares more data than this

    Raises
    ------
    cprop.CpropFileError (a ValueError) — not a regular file, not an IDX file,
        corrupt gzip data, data shorter or longer than the header declares, or
        more than `max_bytes` declared.
    FileNotFoundError — no such file.
    """
    max_bytes = check_positive_int(max_bytes, "max_bytes", minimum=0, maximum=None)
    with open_regular_file(path) as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        try:
            return _read_idx(f, path, max_bytes, None if gz else os.fstat(raw.fileno()).st_size)
        except (EOFError, OSError, zlib.error) as exc:   # gzip.BadGzipFile is an OSError
            if not gz:
                raise
            raise CpropFileError(f"{path!r}: corrupt or truncated gzip data ({exc})") from None


def _read_idx(f, path, max_bytes, file_size):
    """The array in the IDX stream `f`; `file_size` is the file's size when it is not compressed."""
    magic = _read_upto(f, 4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES:
        raise CpropFileError(f"{path!r} is not an IDX file (bad magic number)")
    ndim = magic[3]
    dims = _read_upto(f, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise CpropFileError(f"{path!r}: truncated IDX header ({ndim} dimensions need {4 + 4 * ndim} bytes)")
    shape = struct.unpack(">" + "I" * ndim, dims)
    dtype = np.dtype(_IDX_TYPES[magic[2]])
    expected = math.prod(shape) * dtype.itemsize   # exact: no int64 wrap-around
    if expected > max_bytes:
        raise CpropFileError(f"{path!r}: IDX header declares shape {shape}, {expected} bytes of data, "
                             f"more than max_bytes={max_bytes}; pass a larger max_bytes to read it")
    header = 4 + 4 * ndim
    if file_size is not None and file_size - header != expected:
        raise CpropFileError(f"{path!r}: IDX header promises {expected} bytes of data for shape {shape}, "
                             f"file has {file_size - header}")
    data = _read_upto(f, expected)
    if len(data) < expected:
        raise CpropFileError(f"{path!r}: IDX header promises {expected} bytes of data for shape {shape}, "
                             f"file has {len(data)}")
    if f.read(1):
        raise CpropFileError(f"{path!r}: IDX header promises {expected} bytes of data for shape {shape}, "
                             f"file has at least {expected + 1}")
    out = np.frombuffer(data, dtype=dtype).reshape(shape)      # writable: data is a bytearray
    if not dtype.isnative:
        out = out.byteswap(inplace=True).view(dtype.newbyteorder("="))
    return out


def _read_upto(f, n):
    """Up to n bytes from f, fewer only at its end; memory grows with what actually arrives."""
    data = bytearray()
    while len(data) < n:
        chunk = f.read(min(_CHUNK, n - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def load_mnist(path: str | os.PathLike, kind: str = "train",
               max_bytes: int = MAX_IDX_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """MNIST (or Fashion-MNIST) from the standard IDX files in directory `path`.

    Looks for ``{train,t10k}-images-idx3-ubyte[.gz]`` and ``…-labels-idx1-ubyte[.gz]``;
    `max_bytes` bounds each file's data as in :func:`read_idx`.

    Returns
    -------
    X : float32 array (n, 784), pixels scaled to [0, 1]
    y : int64 array (n,)
    """
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(kind)
    if prefix is None:
        raise ValueError(f"kind must be 'train' or 'test', got {kind!r}")

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no directory {path!r}: load_mnist reads the four IDX files in a directory")

    def find(stem):
        for name in (stem, stem + ".gz"):
            full = os.path.join(path, name)
            if os.path.exists(full):
                return full
        raise FileNotFoundError(f"no {stem}[.gz] in {path!r}")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"), max_bytes)
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"), max_bytes)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
    X = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return X, labels.astype(np.int64)
