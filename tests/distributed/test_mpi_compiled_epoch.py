"""Phase 2: the distributed epoch compiled, its allreduce called from the nogil loop through the
MPI_Allreduce bound from mpi4py's library, trains exactly as phase 1 (the allreduce from Python,
``CPROP_MPI_EPOCH=python``); a binding that fails its check leaves every rank on phase 1."""
import warnings

import numpy as np
import pytest

import cprop
from cprop import distributed

from mpi_helpers import OVERSUBSCRIBED, assert_same_on_every_rank, comm  # noqa: F401 (fixture)
from test_mpi_training import assert_close, data, make

pytestmark = OVERSUBSCRIBED


@pytest.fixture
def phases(monkeypatch):
    """Record, per fit, whether _compiled_allreduce chose phase 2 (handles) or phase 1 (None)."""
    chosen = []
    choose = distributed._compiled_allreduce

    def recorded(*args, **kwargs):
        handles = choose(*args, **kwargs)
        chosen.append(handles is not None)
        return handles
    monkeypatch.setattr(distributed, "_compiled_allreduce", recorded)
    return chosen


def trained(monkeypatch, phase, X, y, fit_kwargs=None, n_threads=1, **make_kwargs):
    """A trainer of test_mpi_training's make(), fitted with the epoch of `phase` (compiled, python)."""
    with monkeypatch.context() as m:
        m.setenv("CPROP_MPI_EPOCH", phase)
        trainer = make(**make_kwargs)
        trainer.n_threads = n_threads
        trainer.fit(X, y, **(fit_kwargs or dict(epochs=3)))
    return trainer


def assert_same_training(compiled, python):
    assert_close(compiled.net.params, python.net.params, np.float64)
    if python.net.buffers.size:     # BatchNorm's running statistics
        assert_close(compiled.net.buffers, python.net.buffers, np.float64)
    for a, b in zip(compiled.optimizer.state, python.optimizer.state):
        assert_close(a, b, np.float64)
    assert compiled.optimizer.step_count == python.optimizer.step_count
    np.testing.assert_allclose(compiled.history.loss, python.history.loss, rtol=1e-12)
    assert_close(compiled.net.grads, python.net.grads, np.float64)
    assert compiled.net._grad_rows == python.net._grad_rows


def test_pack_slots_are_the_compiled_epochs():
    assert cprop._lazy.core.PACK_SLOTS == (distributed._LOSS, distributed._INTERRUPT, distributed._FAILED,
                                           distributed._REJECTED, distributed._N_SLOTS)


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in_order"])
@pytest.mark.parametrize("optimizer", ["momentum", "nesterov_wd", "adam"])
def test_compiled_epoch_trains_as_the_python_epoch(comm, monkeypatch, phases, optimizer, shuffle):
    # 301 rows, batches of 32: a ragged last batch of 13, uneven shares over 2 or 3 ranks
    X, y = data(301)
    compiled = trained(monkeypatch, "compiled", X, y, comm=comm, optimizer=optimizer, shuffle=shuffle)
    python = trained(monkeypatch, "python", X, y, comm=comm, optimizer=optimizer, shuffle=shuffle)
    assert phases == [True, False]
    assert_same_on_every_rank(comm, compiled)
    assert_same_training(compiled, python)


def test_compiled_epoch_with_two_threads_per_rank(comm, monkeypatch, phases):
    # wide enough for a team of 2 on each rank; BatchNorm's statistics over the whole batch
    # (columns split between the threads) and its running statistics summed over the ranks,
    # dropout masks by the row's place in the epoch
    def layers():
        return [cprop.Dense(8, 128), cprop.BatchNorm(128, activation="relu"), cprop.Dropout(0.2),
                cprop.Dense(128, 128, "tanh"), cprop.Dense(128, 3)]
    X, y = data(403)
    kw = dict(comm=comm, layers=layers, optimizer="adam", batch_size=64, n_threads=2)
    compiled = trained(monkeypatch, "compiled", X, y, **kw)
    if cprop._lazy.core.OPENMP:
        assert cprop._lazy.core.take_team_stats()[0] == 2     # the compiled epoch's team
    python = trained(monkeypatch, "python", X, y, **kw)
    assert phases == [True, False]
    assert_same_on_every_rank(comm, compiled)
    assert_same_training(compiled, python)


def test_compiled_epoch_with_shards(comm, monkeypatch, phases):
    # shards of uneven sizes, each shuffled with its rank's own generator
    X, y = data(100 + 37 * comm.rank, seed=comm.rank)
    kw = dict(comm=comm, optimizer="nesterov_wd", batch_size=16)
    compiled = trained(monkeypatch, "compiled", X, y, dict(epochs=2, sharded=True), **kw)
    python = trained(monkeypatch, "python", X, y, dict(epochs=2, sharded=True), **kw)
    assert phases == [True, False]
    assert_same_on_every_rank(comm, compiled)
    assert_same_training(compiled, python)


class _Proxy:
    """distributed._core on one rank, with a few attributes replaced."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(cprop._lazy.core, name)


def _wrong_sum(handles, buf):
    code = cprop._lazy.core.mpi_allreduce(handles, buf)     # still a collective call
    buf[0] += 1
    return code


@pytest.mark.parametrize("failure", ["not found", "wrong sum"])
def test_binding_that_fails_its_check_leaves_every_rank_on_python_epoch(comm, monkeypatch, phases, failure):
    def never(*args):
        raise AssertionError("train_epoch_mpi called although the binding failed its check")
    last = comm.Get_size() - 1
    if comm.rank == last:
        replaced = ({"_bind_mpi": lambda module: False} if failure == "not found"
                    else {"mpi_allreduce": _wrong_sum})
        monkeypatch.setattr(distributed, "_core", _Proxy(train_epoch_mpi=never, **replaced))
    else:
        monkeypatch.setattr(distributed, "_core", _Proxy(train_epoch_mpi=never))
    X, y = data(150)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = trained(monkeypatch, "compiled", X, y, comm=comm)
    assert phases == [False]
    messages = [str(w.message) for w in caught if "MPI_Allreduce" in str(w.message)]
    if comm.rank == 0:      # rank 0 says so, once
        assert len(messages) == 1 and "through mpi4py instead" in messages[0], messages
    else:
        assert messages == []
    python = trained(monkeypatch, "python", X, y, comm=comm)
    assert_same_on_every_rank(comm, fallback)
    assert_same_training(fallback, python)
