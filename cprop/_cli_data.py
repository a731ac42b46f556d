"""Reading tabular data for the command line: CSV (with a header) or NPZ."""
import os

import numpy as np


def read_table(path, target=None):
    """(X, y, feature_names) from a CSV with a header row or an NPZ file.

    CSV: `target` names (or indexes) the target column; every other column is a
    feature. NPZ: arrays ``X`` and ``y`` (or `target` names the y array);
    without a target, y is None.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            if "X" not in npz.files:
                raise ValueError(f"{path}: an NPZ needs an array named 'X' (it has {npz.files})")
            X = npz["X"]
            key = target or "y"
            y = npz[key] if key in npz.files else None
            if target is not None and y is None:
                raise ValueError(f"{path}: no array named {target!r} (it has {npz.files})")
        if X.ndim != 2:
            raise ValueError(f"{path}: X must be 2-D, got shape {X.shape}")
        return X, y, [f"x{i}" for i in range(X.shape[1])]
    with open(path, newline="") as f:
        header = f.readline().strip()
    if not header:
        raise ValueError(f"{path}: empty file")
    names = [h.strip().strip('"') for h in header.split(",")]
    try:
        data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: every value after the header must be a number ({exc})") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: no data rows")
    if data.shape[1] != len(names):
        raise ValueError(f"{path}: header has {len(names)} columns, data has {data.shape[1]}")
    if target is None:
        return data, None, names
    if target in names:
        col = names.index(target)
    elif target.lstrip("-").isdigit() and -len(names) <= int(target) < len(names):
        col = int(target) % len(names)
    else:
        raise ValueError(f"{path}: no column {target!r}; columns are {', '.join(names)}")
    keep = [i for i in range(len(names)) if i != col]
    return data[:, keep], data[:, col], [names[i] for i in keep]
