"""Files built to hurt: special files, zip and gzip bombs, crafted members and metadata,
stripped optimizer state, saves through odd paths, and every byte of a saved file damaged."""
import contextlib
import gzip
import io
import json
import os
import re
import signal
import stat
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from numpy.testing import assert_array_equal

import cprop
from cprop import io as cprop_io

pytestmark = pytest.mark.skipif(os.name != "posix", reason="FIFOs, devices, modes and symlinks are POSIX")


def mentions(*words):
    """A `match=` pattern that finds every one of `words` in the message, in any order."""
    return "(?is)^" + "".join(f"(?=.*{re.escape(w)})" for w in words)


def small_problem(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.integers(0, 2, n)


def fitted_trainer(optimizer, epochs=1):
    net = cprop.Sequential([cprop.Dense(3, 4, "tanh"), cprop.Dense(4, 2)], seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=optimizer, batch_size=8, seed=0)
    if epochs:
        trainer.fit(*small_problem(), epochs=epochs)
    return trainer


OPTIMIZERS = {"sgd": lambda: cprop.SGD(lr=0.1),
              "sgd-momentum": lambda: cprop.SGD(lr=0.1, momentum=0.9),
              "adam": lambda: cprop.Adam(lr=0.01),
              "adamw": lambda: cprop.AdamW(lr=0.01)}


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: a blocking open() or read() is interrupted by the alarm."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def peak_memory():
    """Records the peak of Python's and NumPy's allocations (tracemalloc sees both) in `.peak`."""
    class Peak:
        peak = None
    tracemalloc.start()
    try:
        yield Peak
    finally:
        Peak.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


LOADERS = {"cprop.load": cprop.load, "Trainer.load": cprop.Trainer.load}


def npy(array):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_header(descr, shape):
    """A format-1.0 .npy header, by hand: the shape may be anything."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def meta_npy(meta):
    return npy(np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def network_meta(sizes=(3, 2), dtype="float32", listed=True):
    n = sum(sizes[i] * sizes[i + 1] + sizes[i + 1] for i in range(len(sizes) - 1))
    meta = {"format": "cprop", "version": 1, "kind": "network",
            "architecture": {"sizes": list(sizes), "activations": ["identity"] * (len(sizes) - 1),
                             "dtype": dtype}}
    if listed:
        meta["members"] = {"params": {"dtype": dtype, "shape": [n]}}
    return meta, n


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    """An archive of raw members: {file name in the zip: bytes}."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def read_members(path):
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def saved_meta(path):
    return json.loads(np.load(io.BytesIO(read_members(path)["__cprop__.npy"])).tobytes())


def with_meta(path, meta, drop=()):
    """Rewrite the archive at `path` with `meta` and without the members named in `drop`."""
    members = {k: v for k, v in read_members(path).items() if k[:-4] not in drop}
    members["__cprop__.npy"] = meta_npy(meta)
    return write_zip(path, members)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.npz"
    os.mkfifo(path)
    return path


# -- saving: modes, symlinks, odd paths -------------------------------------------------------------

@contextlib.contextmanager
def umask(mask):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


SAVERS = {"network": lambda t: t.net.save, "trainer": lambda t: t.save}


@pytest.fixture(params=list(SAVERS))
def save(request):
    return SAVERS[request.param](fitted_trainer(cprop.SGD(lr=0.1, momentum=0.9)))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_a_new_file_gets_the_umasks_mode(mask, save, tmp_path):
    with umask(mask):
        save(tmp_path / "new.npz")
    assert mode_of(tmp_path / "new.npz") == 0o666 & ~mask


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664, 0o640])
def test_an_existing_file_keeps_its_mode(mode, save, tmp_path):
    path = tmp_path / "old.npz"
    path.write_bytes(b"previous")
    path.chmod(mode)
    with umask(0o077):
        save(path)
    assert mode_of(path) == mode
    assert cprop.load(path) is not None


def test_save_writes_through_a_symlink(save, tmp_path):
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "real.npz"
    target.write_bytes(b"previous")
    target.chmod(0o640)
    link = tmp_path / "link.npz"
    link.symlink_to(os.path.join("models", "real.npz"))          # relative, as users make them

    save(link)

    assert link.is_symlink() and os.readlink(link) == os.path.join("models", "real.npz")
    assert cprop.load(target) is not None and mode_of(target) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "models"]       # no temporary files
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["real.npz"]


def test_save_through_a_dangling_symlink_creates_its_target(save, tmp_path):
    link = tmp_path / "link.npz"
    link.symlink_to(tmp_path / "target.npz")
    save(link)
    assert link.is_symlink() and cprop.load(tmp_path / "target.npz") is not None


@pytest.mark.parametrize("name, error, words", [
    ("", ValueError, ["empty"]),
    (".", IsADirectoryError, ["directory"]),
    ("sub", IsADirectoryError, ["directory"]),
    ("sub/", IsADirectoryError, ["directory"]),
    ("nosuchdir/", IsADirectoryError, ["directory"]),
    ("nosuchdir/x.npz", FileNotFoundError, ["nosuchdir"]),
], ids=repr)
def test_save_refuses_a_directory_or_an_empty_path(name, error, words, save, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=mentions(*words)):
        save(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert list((tmp_path / "sub").iterdir()) == []
    assert not any(p.name.endswith(".tmp") for p in tmp_path.parent.iterdir())


def test_save_refuses_to_replace_a_fifo(fifo, save):
    with deadline(20), pytest.raises(cprop.CpropFileError, match=mentions("pipe.npz", "not a regular file")):
        save(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in fifo.parent.iterdir()) == ["pipe.npz"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError(28, "No space left on device")], ids=repr)
def test_an_interrupted_save_leaves_no_temporary_file(error, save, tmp_path, monkeypatch):
    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise error
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(type(error) if isinstance(error, BaseException) else error):
        save(tmp_path / "x.npz")
    assert list(tmp_path.iterdir()) == []
