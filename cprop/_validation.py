"""Checks at the Python boundary, in one place.

Every public entry converts and validates here, once, before anything reaches
a compiled kernel that runs without bounds checks. Messages say what was
expected and what was given.
"""
import math
import numbers
import sys
import weakref

import numpy as np

DTYPES = {"float32": np.float32, "float64": np.float64}


def as_dtype(dtype):
    """np.float32 / np.float64 from "float32", "float64", np.float32, np.dtype(...)."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return DTYPES[name]


def _as_numeric_array(a, name):
    if hasattr(a, "__array__") or isinstance(a, (list, tuple, numbers.Number)):
        arr = np.asarray(a)
    else:
        raise TypeError(f"{name} must be an array-like of numbers, got {type(a).__name__}")
    if arr is a:
        # a view of our own: the caller's array object can be reshaped in place
        # (arr.shape = ...) by a callback or another thread after we checked it
        arr = arr.view()
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (bool, int or float), got dtype {arr.dtype}")
    return arr


def hold_memory(*arrays):
    """Keep the memory of `arrays` (views of callers' arrays, or None) where it is while the
    result lives: a weak reference to each array that owns it. numpy refuses to resize an
    array that has weak references, even with ``refcheck=False``, so a callback or another
    thread cannot reallocate what a kernel is reading."""
    held = []
    for arr in arrays:
        owner = arr
        while isinstance(owner, np.ndarray) and not owner.flags.owndata and isinstance(owner.base, np.ndarray):
            owner = owner.base
        if isinstance(owner, np.ndarray) and owner.flags.owndata:
            held.append(weakref.ref(owner))
    return tuple(held)


def network_arrays(net):
    """What a fit's epochs hand the core: the network, its plan and arrays (compared by identity)."""
    return (net, net._plan, net._params, net._grads, net._buffers)


def check_same_network(net, arrays):
    """RuntimeError unless `net` still has the plan and arrays `arrays` (network_arrays)."""
    if any(a is not b for a, b in zip(network_arrays(net), arrays)):
        raise RuntimeError("the network's plan or arrays were replaced during fit (from a callback "
                           "or another thread); the fit's workspace and checked data are sized for "
                           "the network it started with")


class DataGuard:
    """Called, it raises RuntimeError if the memory of the arrays it watches (the fit's data,
    its sample weights and validation data) was replaced since it was made: a callback, a
    signal handler or another thread calling ``ndarray.__setstate__``, which frees an
    array's memory whatever refers to it. The fit checks before every epoch; the compiled
    epoch after Python's signal handlers, which run between its batches."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.memory = memory_of(*arrays)

    def __call__(self):
        if memory_of(*self.arrays) != self.memory:
            raise RuntimeError("the training or validation data's memory was replaced during fit "
                               "(from a callback, a signal handler or another thread); pass new "
                               "data to a new fit()")


def memory_of(*arrays):
    """Where the memory the epochs read lives: for each ndarray among `arrays`, the address
    and size of the array that owns its memory (a view keeps its address when its owner's
    memory is swapped and freed)."""
    found = []
    for a in arrays:
        if not isinstance(a, np.ndarray):
            continue
        owner = a
        while not owner.flags.owndata and isinstance(owner.base, np.ndarray):
            owner = owner.base
        found.append((a.__array_interface__["data"][0], owner.__array_interface__["data"][0], owner.nbytes))
    return found


def pinned_zeros(n, dtype):
    """(a zeroed 1-D array of n values, its pin) for memory that compiled calls read without
    the GIL and that only cprop allocates: the network's parameters, gradients and running
    statistics, the optimizer's state. No ndarray owns the memory: it is a bytearray, which
    the returned memoryview (keep it with the array) holds exported for good. So neither
    resize(refcheck=False) nor ndarray.__setstate__ (which frees an owning array's memory
    whatever else refers to it) nor resizing the bytearray can free or move it under a
    running kernel. Aligned to 64 bytes."""
    dtype = np.dtype(dtype)
    try:
        buf = bytearray(n * dtype.itemsize + 64)
    except (MemoryError, OverflowError):
        raise MemoryError(f"cannot allocate {n:,} {dtype.name} values ({n * dtype.itemsize / 2**30:,.3g} GiB) "
                          "for a network's parameters, gradients or optimizer state") from None
    pin = memoryview(buf)      # the caller's, not the array's: releasing the array's own does not free buf
    address = np.frombuffer(buf, np.uint8, count=1).__array_interface__["data"][0]
    return np.frombuffer(buf, dtype, count=n, offset=-address % 64), pin


def is_pinned(arr, pins):
    """Whether arr is one of the arrays pinned_zeros made with one of `pins`."""
    return any(getattr(arr.base, "obj", None) is pin.obj for pin in pins)


def pinned_copy(arr):
    """(a pinned 1-D copy of arr, its pin): see pinned_zeros."""
    out, pin = pinned_zeros(arr.size, arr.dtype)
    out[...] = arr.reshape(-1)
    return out, pin


def check_finite(arr, name):
    """ValueError naming `name` when a float array holds NaN or infinity.

    Fast path without a temporary of the array's size: a NaN or an infinity
    makes the sum non-finite (inf - inf is NaN). Only when the sum is not
    finite (which finite values can also cause, by overflowing it) is every
    element checked.
    """
    if arr.dtype.kind != "f":
        return
    with np.errstate(all="ignore"):       # inf + (-inf) or overflow in the sum are expected here
        if np.isfinite(np.sum(arr)):
            return
    finite = np.isfinite(arr)
    if not finite.all():
        bad = finite.size - np.count_nonzero(finite)
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s); cprop needs finite numbers")


def is_sparse(X):
    """Whether X is a scipy.sparse matrix or array (of any format)."""
    # scipy.sparse is not imported for dense input: X cannot be one of its
    # matrices unless the module is already loaded
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and sparse.issparse(X)


class CSRInput:
    """A validated CSR matrix, as the compiled core reads it.

    ``data`` in the network's dtype, ``indices`` and ``indptr`` as intp, all three
    fresh arrays of cprop's own: changing the user's matrix afterwards cannot make
    a kernel read outside them. Every index lies in [0, n_features), ``indptr``
    runs from 0 to nnz without decreasing. Duplicate entries are kept (the kernels
    add them up, as scipy does); indices need not be sorted.
    """

    __slots__ = ("data", "indices", "indptr", "shape")
    format = "csr"      # for check_sparse_X, which checks (and copies) one handed back to it

    def __init__(self, data, indices, indptr, shape):
        self.data, self.indices, self.indptr, self.shape = data, indices, indptr, shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def nnz(self):
        return self.data.shape[0]

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, rows):
        """The rows `rows` (a 1-D integer array) as a new CSRInput (validation splits)."""
        rows = np.asarray(rows, dtype=np.intp)
        counts = self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.zeros(rows.shape[0] + 1, dtype=np.intp)
        np.cumsum(counts, out=indptr[1:])
        # the positions of the chosen rows' nonzeros, row after row
        take = np.repeat(self.indptr[rows] - indptr[:-1], counts) + np.arange(indptr[-1], dtype=np.intp)
        return CSRInput(self.data[take], self.indices[take], indptr, (rows.shape[0], self.shape[1]))

    def astype(self, dtype):
        """The same matrix with its values in `dtype` (itself when they already are)."""
        if self.data.dtype == dtype:
            return self
        data = _converted(self.data, dtype, "X")
        return CSRInput(data, self.indices, self.indptr, self.shape)

    def core_args(self):
        """(the placeholder X of shape (n_samples, 0), the CSR keyword arguments) that the
        compiled core's train_epoch, batch_gradient and forward take for this matrix."""
        return (np.empty((self.shape[0], 0), dtype=self.data.dtype),
                {"csr_data": self.data, "csr_indices": self.indices, "csr_indptr": self.indptr})

    def toarray(self):
        """The dense matrix, C-contiguous in the values' dtype."""
        from ._lazy import core
        out = np.empty(self.shape, dtype=self.data.dtype)
        core.sparse_to_dense(self.data, self.indices, self.indptr, out)
        return out

    def dense_rows(self, start, stop):
        """Rows start:stop as a dense C-contiguous block."""
        from ._lazy import core
        out = np.empty((stop - start, self.shape[1]), dtype=self.data.dtype)
        core.sparse_to_dense(self.data, self.indices, self.indptr, out,
                             np.arange(start, stop, dtype=np.intp))
        return out


def check_sparse_X(X, dtype, n_features=None, name="X"):
    """A scipy.sparse X (any format: converted with ``.tocsr()``) as a :class:`CSRInput`.

    A CSRInput handed in is checked and copied like any CSR matrix: its arrays are plain
    attributes, which may have been changed since it was made."""
    shape = tuple(X.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got a sparse array of shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: got shape {shape}, need at least one sample")
    if n_features is not None and shape[1] != n_features:
        raise ValueError(f"{name} has {shape[1]} features per sample, the network expects {n_features}")
    csr = X if X.format == "csr" else X.tocsr()
    # our own copies first, then every check on them: what the kernels read is what was checked
    indptr = np.array(csr.indptr, copy=True)
    if indptr.dtype.kind not in "iu":     # a float indptr cast to integers would re-cut the rows
        raise TypeError(f"{name}'s indptr must be integers, got dtype {indptr.dtype}")
    if indptr.size and indptr.dtype.kind == "u" and indptr.max() > np.iinfo(np.intp).max:
        raise ValueError(f"{name}'s indptr holds values beyond {np.iinfo(np.intp).max}")
    indptr = indptr.astype(np.intp, copy=False)
    indices = np.array(csr.indices, copy=True)
    values = np.array(csr.data, copy=True)
    n_samples, n_cols = shape
    if indptr.ndim != 1 or indptr.shape[0] != n_samples + 1:
        raise ValueError(f"{name}'s indptr must have {n_samples + 1} entries (n_samples + 1), "
                         f"got shape {indptr.shape}")
    if indices.dtype.kind not in "iu":
        raise TypeError(f"{name}'s indices must be integers, got dtype {indices.dtype}")
    if values.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (bool, int or float), got dtype {values.dtype}")
    nnz = int(indptr[-1])
    if indptr[0] != 0 or (indptr.shape[0] > 1 and (np.diff(indptr) < 0).any()):
        raise ValueError(f"{name}'s indptr must start at 0 and never decrease, got "
                         f"indptr[0]={indptr[0]} and a smallest step of {np.diff(indptr).min()}")
    if indices.ndim != 1 or values.ndim != 1 or indices.shape[0] < nnz or values.shape[0] < nnz:
        raise ValueError(f"{name}'s indptr ends at {nnz} nonzeros but it holds {indices.shape} indices "
                         f"and {values.shape} values")
    indices, values = indices[:nnz], values[:nnz]
    if nnz and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(f"{name}'s column indices must lie in [0, {n_cols}), got values in "
                         f"[{indices.min()}, {indices.max()}]")
    check_finite(values, name)
    data = _converted(values, dtype, name)
    return CSRInput(data, np.ascontiguousarray(indices, dtype=np.intp), indptr, (n_samples, n_cols))


def check_X(X, dtype, n_features=None, name="X", accept_sparse=False, finite=True) -> np.ndarray:
    """X as a C-contiguous 2-D array of `dtype`; no copy when it already is one.

    A scipy.sparse X: a validated :class:`CSRInput` when `accept_sparse`, else a
    TypeError naming `accept_sparse` (a string: what to use instead).
    finite=False leaves the check for NaN/inf to the caller (the compiled forward, which
    reads X anyway) where X is already what the core takes; a conversion still checks.
    """
    if is_sparse(X) or isinstance(X, CSRInput):
        if accept_sparse is True:
            return check_sparse_X(X, dtype, n_features, name)
        raise TypeError(f"{name} is a sparse matrix ({type(X).__name__}), which {accept_sparse or 'this'} "
                        "does not take; pass a dense array (X.toarray())")
    arr = _as_numeric_array(X, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got an array of shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: got shape {arr.shape}, need at least one sample")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features per sample, the network expects {n_features}")
    if finite or arr.dtype != dtype or not arr.flags.c_contiguous:
        check_finite(arr, name)
    return _converted(arr, dtype, name)


def _converted(arr, dtype, name):
    """arr as C-contiguous `dtype`; ValueError when finite values overflow it (1e300 to float32)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    if out is not arr and arr.dtype.kind == "f" and arr.dtype.itemsize > out.dtype.itemsize:
        with np.errstate(all="ignore"):
            overflow = not np.isfinite(np.sum(out)) and not np.isfinite(out).all()
        if overflow:
            raise ValueError(f"{name} has values beyond the range of {np.dtype(dtype).name} "
                             f"(largest magnitude {np.abs(arr).max():.3g})")
    return out


def check_labels(y, n_samples, n_classes, name="y"):
    """Integer class labels of shape (n_samples,), each in [0, n_classes), as intp: always a
    copy, never a view of the caller's array."""
    arr = _as_numeric_array(y, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be integer class labels of shape ({n_samples},), got shape {arr.shape}")
    if arr.shape[0] != n_samples:
        raise ValueError(f"{name} has {arr.shape[0]} labels but X has {n_samples} samples")
    # checked and returned as a copy of our own: the labels index the output's columns, so
    # the caller's array changed afterwards (from a callback, another thread) is not read
    arr = arr.copy()
    if arr.dtype.kind == "f":
        check_finite(arr, name)
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must be integer class labels for cross_entropy, got non-integer values")
    # range first, on the values as given: a cast of 1e30 or 2**64 to intp would wrap
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"{name} labels must lie in [0, {n_classes}) for a network with {n_classes} outputs, "
            f"got values in [{arr.min()}, {arr.max()}]"
        )
    return np.ascontiguousarray(arr, dtype=np.intp)


def check_targets(y, n_samples, n_outputs, dtype, name="y", binary=False):
    """Float targets of shape (n_samples, n_outputs); (n_samples,) accepted when n_outputs is 1."""
    arr = _as_numeric_array(y, name)
    if arr.ndim == 1 and n_outputs == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != n_outputs:
        expected = f"({n_samples}, {n_outputs})" + (f" or ({n_samples},)" if n_outputs == 1 else "")
        raise ValueError(f"{name} must have shape {expected}, got {arr.shape}")
    if arr.shape[0] != n_samples:
        raise ValueError(f"{name} has {arr.shape[0]} rows but X has {n_samples} samples")
    check_finite(arr, name)
    arr = _converted(arr, dtype, name)
    if binary and not np.all((arr == 0) | (arr == 1)):
        other = arr[(arr != 0) & (arr != 1)]
        raise ValueError(f"{name} must hold 0/1 targets for binary_cross_entropy, got "
                         f"{other.size} other value(s), such as {other.flat[0].item()!r}")
    return arr


def check_sample_weight(w, n_samples, dtype, name="sample_weight"):
    """One finite weight >= 0 per sample, not all 0: (the weights divided by their mean, as
    a C-contiguous 1-D `dtype` array; that mean, a float).

    A weighted mean depends only on the weights' ratios; dividing by their mean (as
    scikit-learn's estimators normalise sample weights) in float64, before the cast, keeps
    weights of any scale (all 1e-30, or 1e300) from underflowing or overflowing the
    network's dtype. Callers that need the original scale (a decay divided by the summed
    weights) multiply by the mean."""
    arr = _as_numeric_array(w, name)
    if arr.shape != (n_samples,):
        raise ValueError(f"{name} must have shape ({n_samples},), one weight per sample, got {arr.shape}")
    check_finite(arr, name)
    arr = np.asarray(arr, dtype=np.float64)
    if (arr < 0).any():
        raise ValueError(f"{name} must be >= 0, got a smallest weight of {arr.min()}")
    peak = arr.max()
    if peak == 0:
        raise ValueError(f"{name} must contain at least one non-zero weight, got all zeros")
    scaled = arr / peak                  # in [0, 1]: its mean cannot overflow
    mean_scaled = scaled.mean()
    return np.ascontiguousarray(scaled / mean_scaled, dtype=dtype), float(peak * mean_scaled)


# the kernels index with C ints in BLAS calls: sizes beyond this are refused up front
MAX_SIZE = 2**31 - 1


def check_positive_int(value, name, minimum=1, maximum=MAX_SIZE):
    """An int in [minimum, maximum]; TypeError for non-integers (bools included)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_bool(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_real(value, name, low=None, high=None, low_open=False, high_open=False):
    """A finite real number in [low, high] (open ends when asked)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_parameter_values(values, shape, name, dtype):
    """Finite real numbers of exactly `shape`, for copying into live parameters of `dtype`:
    checked after the conversion, so 1e300 for a float32 network (inf once cast) is refused."""
    arr = _as_numeric_array(values, name)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    check_finite(arr, name)
    return _converted(arr, dtype, name)
