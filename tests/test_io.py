"""Files: round trips, resuming a fit, and refusing every file that is not a valid cprop archive."""
import json
import os
import zipfile

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import cprop
from cprop import io as cprop_io

from conftest import make_net


def small_problem(n=90, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)), rng.integers(0, 3, n)


def fitted_trainer(optimizer, epochs=1):
    net = cprop.Sequential([cprop.Dense(6, 8, "relu"), cprop.Dense(8, 5, "tanh"), cprop.Dense(5, 3)],
                           seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=optimizer, batch_size=16,
                            shuffle=True, seed=0)
    trainer.fit(*small_problem(), epochs=epochs)
    return trainer


# -- round trips ------------------------------------------------------------------

def test_network_round_trip(dtype, tmp_path, rng):
    net = cprop.Sequential([cprop.Dense(5, 7, "leaky_relu"), cprop.Dense(7, 6, "sigmoid"),
                            cprop.Dense(6, 3, "tanh"), cprop.Dense(3, 2)], dtype=dtype, seed=3)
    path = tmp_path / "net.npz"

    net.save(path)
    loaded = cprop.load(str(path))

    assert loaded.architecture() == net.architecture()
    assert [repr(layer) for layer in loaded.layers] == [repr(layer) for layer in net.layers]
    assert loaded.params.dtype == dtype
    assert_array_equal(loaded.params, net.params)
    X = rng.normal(size=(4, 5))
    assert_array_equal(loaded.forward(X), net.forward(X))


def test_load_takes_the_network_of_a_saved_trainer(tmp_path):
    trainer = fitted_trainer(cprop.SGD(lr=0.1))
    trainer.save(tmp_path / "trainer.npz")

    net = cprop.load(tmp_path / "trainer.npz")

    assert net.architecture() == trainer.net.architecture()
    assert_array_equal(net.params, trainer.net.params)


@pytest.mark.parametrize("optimizer", [lambda: cprop.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
                                       lambda: cprop.Adam(lr=0.01),
                                       lambda: cprop.Adam(lr=0.01, eps=0.1, sklearn_style=True)],
                         ids=["sgd-momentum", "adam", "adam-sklearn-style"])
def test_resumed_fit_equals_uninterrupted_fit(optimizer, tmp_path):
    X, y = small_problem()
    straight = fitted_trainer(optimizer(), epochs=4)

    first_half = fitted_trainer(optimizer(), epochs=2)
    first_half.save(tmp_path / "half.npz")
    resumed = cprop.Trainer.load(tmp_path / "half.npz")
    resumed.fit(X, y, epochs=2)

    # momentum / moments, Adam's step count and the shuffling's random state all carried over
    assert_array_equal(resumed.net.params, straight.net.params)
    assert_array_equal(resumed.optimizer.state[0], straight.optimizer.state[0])
    assert resumed.optimizer.step_count == straight.optimizer.step_count
    assert resumed.epochs_done == 4
    assert resumed.history.loss == straight.history.loss
    assert repr(resumed.optimizer) == repr(straight.optimizer)
    assert getattr(resumed.optimizer, "sklearn_style", None) == getattr(straight.optimizer, "sklearn_style", None)


# -- files that are not valid cprop archives --------------------------------------------

@pytest.fixture(params=["network", "trainer"])
def saved_file(request, tmp_path):
    """(path of a valid saved network or trainer, its loader)."""
    path = tmp_path / f"{request.param}.npz"
    trainer = fitted_trainer(cprop.Adam())
    if request.param == "network":
        trainer.net.save(path)
        return path, cprop.load
    trainer.save(path)
    return path, cprop.Trainer.load


def test_truncated_file_raises(saved_file, tmp_path):
    path, loader = saved_file
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    for tenth in range(10):
        truncated.write_bytes(data[:len(data) * tenth // 10])
        with pytest.raises(cprop.CpropFileError):
            loader(truncated)


def test_corrupted_file_loads_or_raises(saved_file, tmp_path):
    # a flipped byte is caught by the zip's CRC, the npy header or the checks on the
    # metadata, or it lands where it changes nothing (a timestamp): never another error
    path, loader = saved_file
    data = path.read_bytes()
    corrupted = tmp_path / "corrupted.npz"
    for i in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        corrupted.write_bytes(bytes(flipped))
        try:
            loaded = loader(corrupted)
        except cprop.CpropFileError:
            continue
        net = getattr(loaded, "net", loaded)
        assert net.architecture() == cprop.load(path).architecture()
        assert np.isfinite(net.params).all()


def test_foreign_npz_raises(tmp_path):
    path = tmp_path / "foreign.npz"
    np.savez(path, weights=np.arange(6.0))

    with pytest.raises(cprop.CpropFileError):
        cprop.load(path)
    with pytest.raises(cprop.CpropFileError):
        cprop.Trainer.load(path)


@pytest.mark.parametrize("content", [b"", np.random.default_rng(0).bytes(3000), b"PK\x03\x04" + bytes(100)],
                         ids=["empty", "random", "zip-magic"])
def test_non_archive_raises(content, tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(content)

    with pytest.raises(cprop.CpropFileError):
        cprop.load(path)


def test_network_file_is_not_a_trainer(tmp_path):
    make_net([3, 2]).save(tmp_path / "net.npz")

    with pytest.raises(cprop.CpropFileError):
        cprop.Trainer.load(tmp_path / "net.npz")


def rewrite(path, meta_changes=(), array_changes=()):
    """Write the archive at `path` again, by hand, with some metadata fields or arrays replaced."""
    meta, arrays = cprop_io.load_archive(path)
    meta.update(meta_changes)
    arrays.update(array_changes)
    np.savez(path, __cprop__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)


def test_rewritten_archive_still_loads(saved_file):
    # the control for the tests below: rewriting by hand, unchanged, keeps a valid file
    path, loader = saved_file
    before = loader(path)

    rewrite(path)

    after = loader(path)
    assert_array_equal(getattr(after, "net", after).params, getattr(before, "net", before).params)


@pytest.mark.parametrize("changes", [
    {"version": 3},
    {"format": "other"},
    {"kind": "tokenizer"},
    {"architecture": {"sizes": [6, 8, 5, 3], "activations": ["relu", "tanh", "swish"], "dtype": "float32"}},
    {"architecture": {"sizes": [6, 8, 5, 4], "activations": ["relu", "tanh", "identity"], "dtype": "float32"}},
    {"architecture": {"sizes": [6, 8, 5, 3], "activations": ["relu", "tanh", "identity"], "dtype": "float64"}},
    {"architecture": {"sizes": [6, -8, 5, 3], "activations": ["relu", "tanh", "identity"], "dtype": "float32"}},
    {"architecture": None},
], ids=str)
def test_invalid_network_metadata_raises(changes, tmp_path):
    path = tmp_path / "net.npz"
    fitted_trainer(cprop.SGD()).net.save(path)
    rewrite(path, changes)

    with pytest.raises(cprop.CpropFileError):
        cprop.load(path)


@pytest.mark.parametrize("changes", [
    {"loss": "hinge"},
    {"optimizer": {"name": "lbfgs", "config": {}, "step_count": 0}},
    {"optimizer": None},
    {"batch_size": 0},
    {"epochs_done": -1},
    {"rng_state": "seed"},
    {"history": {"loss": ["nan?"]}},
    {"history": []},
    {"history": None},
], ids=str)
def test_invalid_trainer_metadata_raises(changes, tmp_path):
    path = tmp_path / "trainer.npz"
    fitted_trainer(cprop.SGD(lr=0.1, momentum=0.9)).save(path)
    rewrite(path, changes)

    with pytest.raises(cprop.CpropFileError):
        cprop.Trainer.load(path)


def test_non_finite_parameters_raise(tmp_path):
    path = tmp_path / "net.npz"
    net = make_net([3, 2])
    net.save(path)
    params = net.params.copy()
    params[0] = np.nan
    rewrite(path, array_changes={"params": params})

    with pytest.raises(cprop.CpropFileError):
        cprop.load(path)


# -- nothing in a file is ever executed ---------------------------------------------------

class MakesDirectoryWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_pickle_bomb(path, marker, entry):
    """A cprop network archive whose `entry` member is a pickled object array (np.save with
    allow_pickle); unpickling it creates the directory `marker`."""
    net = make_net([2, 1])
    net.save(path)
    with np.load(path) as npz:
        members = {name: npz[name] for name in npz.files}
    members[entry] = np.array([MakesDirectoryWhenUnpickled(marker)], dtype=object)
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in members.items():
            with archive.open(name + ".npy", "w") as f:
                np.save(f, array, allow_pickle=True)


@pytest.mark.parametrize("entry", ["params", "__cprop__"])
def test_pickled_object_array_is_refused_unopened(entry, tmp_path):
    # the crafted file is live: NumPy with pickles allowed does run it
    live_marker = tmp_path / "ran-with-allow-pickle"
    write_pickle_bomb(tmp_path / "live.npz", live_marker, entry)
    with np.load(tmp_path / "live.npz", allow_pickle=True) as npz:
        _ = npz[entry]
    assert live_marker.exists()

    marker = tmp_path / "ran-inside-cprop"
    write_pickle_bomb(tmp_path / "bomb.npz", marker, entry)
    with pytest.raises(cprop.CpropFileError):
        cprop.load(tmp_path / "bomb.npz")
    with pytest.raises(cprop.CpropFileError):
        cprop.Trainer.load(tmp_path / "bomb.npz")
    assert not marker.exists()


# -- saving is atomic ------------------------------------------------------------------------

def failing_savez(f, **arrays):
    """Like np.savez, but the disk fills up halfway through."""
    f.write(b"PK\x03\x04 half an archive")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("what", ["network", "trainer"])
def test_failed_save_keeps_the_previous_file(what, tmp_path, monkeypatch):
    trainer = fitted_trainer(cprop.SGD(lr=0.1, momentum=0.9))
    path = tmp_path / "model.npz"
    save = trainer.net.save if what == "network" else trainer.save
    load = cprop.load if what == "network" else cprop.Trainer.load
    save(path)
    before = path.read_bytes()
    trainer.fit(*small_problem(), epochs=1)           # what a second save would write differs

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        save(path)
    with pytest.raises(OSError):
        save(tmp_path / "new.npz")
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load(path) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]     # no temporary files left


def test_save_replaces_the_previous_file(tmp_path):
    path = tmp_path / "net.npz"
    make_net([3, 2], seed=0).save(path)
    second = make_net([4, 3, 2], seed=1)

    second.save(path)

    assert_array_equal(cprop.load(path).params, second.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.npz"]
