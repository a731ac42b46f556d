"""Local SGD (Trainer(average_every=H)): ranks step on their own shares and average every H
steps. With SGD and H=1 that is synchronous training up to rounding; with any H the ranks end
every epoch bitwise identical, and a failure on one rank sends every rank back to the last average."""
import warnings

import numpy as np
import pytest

import cprop

from mpi_helpers import (
    OVERSUBSCRIBED,
    assert_same_on_every_rank,
    comm,  # noqa: F401 (fixture)
)
from test_mpi_failures import fail_share, outcome, overflowing
from test_mpi_training import assert_close, data, make

pytestmark = OVERSUBSCRIBED


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov_wd"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in_order"])
def test_average_every_step_with_sgd_is_synchronous_training(comm, optimizer, shuffle):
    # 301 rows, batches of 32: a ragged last batch, uneven shares over 2 or 3 ranks
    X, y = data(301)
    local = make(comm, optimizer=optimizer, shuffle=shuffle, average_every=1)
    local.fit(X, y, epochs=3)
    synchronous = make(comm, optimizer=optimizer, shuffle=shuffle)
    synchronous.fit(X, y, epochs=3)

    assert_same_on_every_rank(comm, local)
    # the mean of R steps on R·(share's gradient) instead of one step on their sum: rounding only
    np.testing.assert_allclose(local.net.params, synchronous.net.params, rtol=1e-10, atol=1e-10)
    for a, b in zip(local.optimizer.state, synchronous.optimizer.state):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(local.history.loss, synchronous.history.loss, rtol=1e-10)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("average_every", [3, 1000])
def test_ranks_average_to_identical_parameters_that_learn(comm, optimizer, average_every):
    # 1000 > the steps of an epoch: the only average is the epoch's last
    X, y = data(600)
    Xv, yv = data(300, seed=1)
    layers = lambda: [cprop.Dense(8, 32, "relu"), cprop.BatchNorm(32), cprop.Dense(32, 3)]  # noqa: E731
    trainer = make(comm, optimizer=optimizer, average_every=average_every, layers=layers)
    before = trainer.evaluate(Xv, yv)
    trainer.fit(X, y, epochs=4)
    after = trainer.evaluate(Xv, yv)
    synchronous = make(comm, optimizer=optimizer, layers=layers)
    synchronous.fit(X, y, epochs=4)
    reached = synchronous.evaluate(Xv, yv)

    assert_same_on_every_rank(comm, trainer)
    assert trainer.optimizer.step_count == (4 * -(-600 // 32) if optimizer == "adam" else 0)
    assert after["loss"] < 0.6 * before["loss"], (before, after)
    assert after["accuracy"] > reached["accuracy"] - 0.05, (after, reached)
    assert not trainer.net._has_grads   # no rank holds the whole batch's gradient


def test_a_failing_step_on_one_rank_sends_every_rank_back_to_the_last_average(comm):
    # unshuffled batches of 32, averages every 2 steps: row 94 lies in the third batch, on the
    # last rank, so every rank ends at the average after step 2
    X, y, kw = overflowing(200)
    X[94] = 1e200
    trainer = make(comm, shuffle=False, optimizer="adam", average_every=2, **kw)
    reference = make(comm, shuffle=False, optimizer="adam", average_every=2, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = outcome(comm, lambda: trainer.fit(X, y, epochs=3))
        reference.fit(X[:64], y[:64], epochs=1)    # the two steps before the failure, averaged

    assert [g[0] for g in got] == ["DivergenceError"] * comm.Get_size()
    assert trainer.optimizer.step_count == 2
    assert np.isfinite(trainer.net.params).all()
    assert_same_on_every_rank(comm, trainer)
    assert_close(trainer.net.params, reference.net.params, np.float64)


def test_average_every_must_be_a_positive_int_and_is_checked_across_ranks(comm):
    with pytest.raises(ValueError, match="average_every"):
        make(comm, average_every=0)
    X, y = data(100)
    trainer = make(comm, average_every=2 + comm.rank)     # differs between ranks
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1))
    assert all(g[0] is not None and "average_every" in g[1] for g in got), got


def test_averaging_parameters_near_the_largest_float_keeps_them_finite(comm):
    # averaged as a sum over ranks first, two finite float32 values above max/2 would give inf
    X, y = data(100, dtype=np.float32)
    X[:, 0] = 0                    # feature 0 never fires: its weights only get averaged
    net = cprop.Sequential([cprop.Dense(8, 3)], dtype=np.float32, seed=0)
    net.layers[0].W[0, 0] = 2e38
    trainer = cprop.Trainer(net, "cross_entropy", optimizer=cprop.SGD(lr=0.01), batch_size=10, seed=0,
                            comm=comm, n_threads=1, average_every=1)
    trainer.fit(X, y, epochs=2)
    assert np.isfinite(trainer.net.params).all() and trainer.net.layers[0].W[0, 0] > 1e38
    assert_same_on_every_rank(comm, trainer)


def test_an_error_computing_one_share_sends_every_rank_back_to_the_last_average(comm, monkeypatch):
    # the other ranks have taken their own step of that batch when the failure is learnt
    fail_share(monkeypatch, comm, 7)
    X, y = data(200)
    trainer = make(comm, optimizer="nesterov_wd", average_every=4, shuffle=False)
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1))
    assert got[-1][0] == "MemoryError" and all(kind == "DistributedError" for kind, _ in got[:-1])
    assert_same_on_every_rank(comm, trainer)
    reference = make(comm, optimizer="nesterov_wd", average_every=4, shuffle=False)
    reference.fit(X[:128], y[:128], epochs=1)       # the 4 steps up to the last average
    assert_close(trainer.net.params, reference.net.params, np.float64)
