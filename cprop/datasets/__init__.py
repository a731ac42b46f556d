"""Data: the bundled UCI handwritten digits, and a reader for MNIST's IDX files."""
from __future__ import annotations

import gzip
import math
import zlib
import os
import struct

import numpy as np

_DATA = os.path.join(os.path.dirname(__file__), "data")


def load_digits(scale: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten-digits set: 1,797 8×8 images, classes 0-9 (CC BY 4.0, bundled).

    Returns
    -------
    X : float32 array (1797, 64) — pixel counts 0..16, divided by 16 when `scale`
    y : int64 array (1797,) — the digit
    """
    with gzip.open(os.path.join(_DATA, "digits.csv.gz"), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    X, y = data[:, :-1], data[:, -1].astype(np.int64)
    if scale:
        X = X / np.float32(16.0)
    return np.ascontiguousarray(X), y


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An array from an IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ValueError(f"{path!r}: corrupt or truncated gzip data ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path!r} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path!r}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize   # exact: no int64 wrap-around
    if len(data) - header != expected:
        raise ValueError(f"{path!r}: IDX header promises {expected} bytes of data for shape {shape}, "
                         f"file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def load_mnist(path: str | os.PathLike, kind: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST (or Fashion-MNIST) from the standard IDX files in directory `path`.

    Looks for ``{train,t10k}-images-idx3-ubyte[.gz]`` and ``…-labels-idx1-ubyte[.gz]``.

    Returns
    -------
    X : float32 array (n, 784), pixels scaled to [0, 1]
    y : int64 array (n,)
    """
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(kind)
    if prefix is None:
        raise ValueError(f"kind must be 'train' or 'test', got {kind!r}")

    def find(stem):
        for name in (stem, stem + ".gz"):
            full = os.path.join(path, name)
            if os.path.exists(full):
                return full
        raise FileNotFoundError(f"no {stem}[.gz] in {path!r}")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
    X = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return X, labels.astype(np.int64)
