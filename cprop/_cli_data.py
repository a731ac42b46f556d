"""Tabular data for the command line: reading CSV (with a header) or NPZ, checking it,
and the standardisation `cprop train` saves with a model and `cprop predict` applies.

Every problem a user can cause raises :class:`UsageError` (the command line is wrong:
exit code 2) or :class:`Failure` (the data, a file or the training run is: exit code 1),
with a message naming the file, column and line; the command line prints it as one line.
"""
import csv
import os
import zipfile
import zlib

import numpy as np


class UsageError(Exception):
    """A mistake on the command line (an option's value, a missing option): one line, exit code 2."""


class Failure(Exception):
    """Data, a file or a training run the command cannot use: one line, exit code 1."""


class Table:
    """A data file read for training or prediction.

    X : float64 array (n_samples, n_features); y : the target (numbers, or str class
    labels) or None; names : the feature names; target : the target's name or None;
    where(i) : "line 7" (CSV) or "row 6" (NPZ), for messages about sample i.
    """

    def __init__(self, path, X, y, names, target, lines=None):
        self.path, self.X, self.y, self.names, self.target, self.lines = path, X, y, names, target, lines

    def where(self, i):
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i}"


# -- reading -----------------------------------------------------------------------------------

def read_table(path, target=None, drop=None):
    """A :class:`Table` from a CSV file with a header row or an NPZ archive.

    CSV: `target` names (or indexes) the target column, which may hold numbers or
    text class labels; every other column is a feature and must hold numbers.
    Without a target, a column named exactly `drop` (a model's target, when the data
    still holds it) is taken as the target.
    NPZ: arrays ``X`` and ``y`` (or `target` names the y array); without a
    target, y is None.
    """
    if not os.path.exists(path):
        raise Failure(f"{path!r}: no such file")
    if os.path.isdir(path):
        raise Failure(f"{path!r} is a directory, not a data file")
    start = _first_bytes(path)
    kind = _format(path, start)
    if kind == "npz":
        if not start.startswith(b"PK\x03\x04"):
            raise Failure(f"{path!r} is not an NPZ archive (np.savez writes them); "
                          "cprop reads NPZ archives or CSV text")
        return _read_npz(path, target)
    if kind == "npy":
        raise Failure(f"{path!r} is a single .npy array; cprop reads NPZ archives "
                      "(np.savez(path, X=X, y=y)) or CSV text")
    return _read_csv(path, target, drop)


def _first_bytes(path):
    with open(path, "rb") as f:
        return f.read(8)


def _format(path, start):
    """How read_table takes a file of these first bytes: "npz" (by content or name), "npy", "csv"."""
    if start.startswith(b"PK\x03\x04") or path.endswith(".npz"):
        return "npz"
    return "npy" if start.startswith(b"\x93NUMPY") else "csv"


def is_csv(path):
    """Whether read_table reads `path` as CSV text; False when it cannot be read (read_table
    then says why)."""
    try:
        return _format(path, _first_bytes(path)) == "csv"
    except OSError:
        return False


def _read_npz(path, target):
    if target == "X":
        raise UsageError(f"--target X names the features of {path!r}; name the targets' array (default y)")
    key = target if target is not None else "y"
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "X" not in npz.files:
                raise Failure(f"{path!r}: an NPZ needs an array named 'X' (it has {_names(npz.files)})")
            if target is not None and target not in npz.files:
                raise UsageError(f"{path!r} has no array named {target!r} (it has {_names(npz.files)})")
            X = npz["X"]
            y = npz[key] if key in npz.files else None
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise Failure(f"{path!r} holds Python objects (a pickled array); cprop reads only "
                          "arrays of numbers, and of text for class labels") from None
        raise Failure(f"{path!r} is not a readable NPZ archive ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise Failure(f"{path!r} is not a readable NPZ archive ({type(exc).__name__}: {exc})") from None

    if X.ndim != 2:
        raise Failure(f"{path!r}: X must be 2-D (samples, features), got shape {X.shape}")
    _check_kind(X, f"{path!r}: X", text_ok=False)
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise Failure(f"{path!r}: X has shape {X.shape}; it needs at least one sample and one feature")
    X = X.astype(np.float64)
    if y is not None:
        label = f"{path!r}: {key}"
        _check_kind(y, label, text_ok=True)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim not in (1, 2) or (y.ndim == 2 and y.dtype.kind in "US"):
            raise Failure(f"{label} must have shape ({X.shape[0]},) (or (n, outputs) for numbers), "
                          f"got {y.shape}")
        if y.shape[0] != X.shape[0]:
            raise Failure(f"{label} has {y.shape[0]} rows, X has {X.shape[0]}")
        if y.dtype.kind == "S":
            try:
                y = np.char.decode(y, "utf-8")
            except UnicodeDecodeError:
                raise Failure(f"{label} holds bytes that are not UTF-8 text") from None
        if y.dtype.kind == "U":
            y = np.char.strip(y)
    table = Table(path, X, y, [f"x{i}" for i in range(X.shape[1])], key if y is not None else None)
    _check_finite_features(table)
    return table


def _check_kind(a, label, text_ok):
    kinds = "biufUS" if text_ok else "biuf"
    if a.dtype.kind == "c":
        raise Failure(f"{label} holds complex numbers (dtype {a.dtype}); cprop needs real numbers")
    if a.dtype.kind not in kinds:
        what = "numbers or text labels" if text_ok else "numbers"
        raise Failure(f"{label} must hold {what}, got dtype {a.dtype}")


def _read_csv(path, target, drop=None):
    records = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(cell.strip() for cell in row):
                    if any("\x00" in cell for cell in row):
                        raise Failure(f"{path!r} line {reader.line_num} holds a NUL character; "
                                      "cprop reads CSV text")
                    records.append((reader.line_num, [cell.strip() for cell in row]))
    except UnicodeDecodeError as exc:
        raise Failure(f"{path!r} is not UTF-8 text (it holds the byte {exc.object[exc.start:exc.start + 1]!r}); "
                      "cprop reads CSV text with a header row, or NPZ archives") from None
    except csv.Error as exc:
        raise Failure(f"{path!r} is not a readable CSV file ({exc})") from None
    if not records:
        raise Failure(f"{path!r} is empty; cprop needs a header row and rows of data")
    (_, names), rows = records[0], records[1:]
    if len(names) == 1 and any(sep in names[0] for sep in ";\t|"):
        raise Failure(f"{path!r}: the header is one column, {names[0]!r}; cprop reads comma-separated values")
    if _header_is_data(names):
        raise Failure(f"{path!r}: its first line ({_names(names, most=5)}) is all numbers, so it looks "
                      "like a row of data, not a header; cprop reads CSV files whose first line names "
                      "the columns: add such a line")
    if not rows:
        raise Failure(f"{path!r} has a header but no rows of data")
    for line, row in rows:
        if len(row) != len(names):
            raise Failure(f"{path!r} line {line} has {len(row)} values, the header has {len(names)} columns")

    if target is None and drop is not None and names.count(drop) == 1:
        target = drop
    col = None if target is None else _column_index(path, names, target)
    lines = np.array([line for line, _ in rows])
    cells = np.array([row for _, row in rows], dtype=str).reshape(len(rows), len(names))
    # a comma at the end of every line, as some spreadsheets write, makes an unnamed empty column
    blank = [names[i] == "" and bool(np.all(cells[:, i] == "")) for i in range(len(names))]
    keep = [i for i in range(len(names)) if i != col and not blank[i]]
    if not keep:
        raise Failure(f"{path!r} has no feature columns besides the target {names[col]!r}")
    X = np.empty((len(rows), len(keep)))
    for j, i in enumerate(keep):
        values = _numbers(cells[:, i])
        if values is None:
            row = next(r for r, cell in enumerate(cells[:, i]) if _numbers(np.array([cell])) is None)
            raise Failure(f"{path!r}: feature column {names[i]!r} holds {str(cells[row, i])!r} on line "
                          f"{lines[row]}, not a number; features must be numbers (only the --target column "
                          "may hold text labels)")
        X[:, j] = values
    y = None
    if col is not None:
        empty = np.flatnonzero(cells[:, col] == "")
        if empty.size:
            raise Failure(f"{path!r}: the target {names[col]!r} is empty on line {lines[empty[0]]} "
                          f"({empty.size} row(s) in all); every row needs a target")
        y = _numbers(cells[:, col])
        if y is None:                  # text class labels
            y = cells[:, col]
    table = Table(path, X, y, [names[i] for i in keep], None if col is None else names[col], lines)
    _check_finite_features(table, cells=cells, columns=keep)
    return table


def _header_is_data(names):
    """Whether a CSV's first line is numbers rather than column names: all of its non-empty
    fields numbers, and some of them not integers or some repeated. Distinct integers can
    be names (pandas writes 0, 1, 2, ... for unnamed columns; years name columns too)."""
    named = [n for n in names if n != ""]
    if not named or _numbers(np.array(named)) is None:
        return False
    return len(set(named)) < len(named) or not all(n.lstrip("+-").isdigit() for n in named)


def _numbers(cells):
    """float64 values of a column of strings, or None when one of them is not a number.
    Python's float() (which numpy's conversion follows) also reads '1_000' and digits of
    other scripts; a CSV cell like that is refused, as the options are."""
    try:
        values = cells.astype(np.float64)
    except ValueError:
        return None
    if np.char.count(cells, "_").any():
        return None
    try:
        np.char.encode(cells, "ascii")
    except UnicodeEncodeError:
        return None
    return values


def _column_index(path, names, target):
    if target in names:
        if names.count(target) > 1:
            raise Failure(f"{path!r}: the header has {names.count(target)} columns named {target!r}")
        return names.index(target)
    if target.lstrip("-").isdigit() and -len(names) <= int(target) < len(names):
        return int(target) % len(names)
    raise UsageError(f"{path!r} has no column {target!r}; its columns are {_names(names)}")


def _names(names, most=20):
    """Names for a message, repr'd, the list cut after `most`."""
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _check_finite_features(table, cells=None, columns=None):
    finite = np.isfinite(table.X)
    if finite.all():
        return
    row, j = np.argwhere(~finite)[0]
    bad = finite.size - np.count_nonzero(finite)
    value = repr(str(cells[row, columns[j]])) if cells is not None else str(table.X[row, j])
    raise Failure(f"{table.path!r}: feature {table.names[j]!r} has {bad} NaN or infinite value(s), the first "
                  f"{value} on {table.where(row)}; cprop needs finite numbers")


def check_finite_target(table):
    """Failure when a numeric target holds NaN or infinity, naming where."""
    y = table.y
    if y.dtype.kind != "f":
        return
    finite = np.isfinite(y)
    if finite.all():
        return
    row = np.argwhere(~finite)[0][0]
    bad = finite.size - np.count_nonzero(finite)
    raise Failure(f"{table.path!r}: the target {table.target!r} has {bad} NaN or infinite value(s), the "
                  f"first {float(y[row])} on {table.where(row)}; a target must be finite numbers or class labels")


# -- scaling -----------------------------------------------------------------------------------

def column_scaling(A):
    """(mean, std) of each column of a finite float array, without overflow even for values
    near the float64 limit (1e308): each column is divided by its largest magnitude first.
    A constant column gets std 1, so standardising leaves it at zero."""
    peak = np.abs(A).max(axis=0)
    peak[peak == 0] = 1.0
    unit = A / peak
    mean, std = unit.mean(axis=0) * peak, unit.std(axis=0) * peak
    std[std == 0] = 1.0
    return mean, std


def standardize(A, mean, std):
    """(A - mean) / std; halved terms so that A - mean cannot overflow when both are near
    the float64 limit with opposite signs. Non-finite where a value is too far from the
    mean for float64 (possible only for new data far outside the training range)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (A * 0.5 - mean * 0.5) / (std * 0.5)


def available_memory():
    """Bytes of memory available for new allocations (MemAvailable on Linux, physical
    memory elsewhere), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
