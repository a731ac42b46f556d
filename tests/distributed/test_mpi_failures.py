"""Whatever stops or changes training on one rank stops or changes it on every rank, at the
same step: a non-finite loss, Ctrl-C, a callback's stop or error, an error computing a share,
settings or data that differ. No configuration leaves a rank waiting in a collective."""
import os
import signal
import threading
import warnings

import numpy as np
import pytest

import cprop
from cprop import distributed

from mpi_helpers import OVERSUBSCRIBED, assert_same_on_every_rank, comm, shared_dir  # noqa: F401 (fixtures)
from test_mpi_training import assert_close, data, make

pytestmark = OVERSUBSCRIBED


def outcome(comm, fn):
    """Run fn() on this rank; every rank's (exception type name or None, message), gathered."""
    try:
        fn()
        mine = (None, "")
    except BaseException as exc:        # KeyboardInterrupt included
        mine = (type(exc).__name__, str(exc))
    return comm.allgather(mine)


def last(comm):
    return comm.Get_size() - 1


def overflowing(n, seed=0):
    """(X, one-hot targets, trainer keywords) of a relu network trained on mse: a row of 1e200
    makes its output about 1e200 and the loss infinite (tanh would saturate instead)."""
    X, y = data(n, seed=seed)
    return X, np.eye(3)[y], dict(layers=lambda: [cprop.Dense(8, 16, "relu"), cprop.Dense(16, 3)], loss="mse")


@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
def test_nonfinite_loss_on_one_rank_stops_every_rank_at_that_step(comm, on_divergence):
    # Adam counts its steps. Unshuffled batches of 32: row 94 is the last rank's (over 2 or 3
    # ranks) in the third batch, so every rank must stop before the third step
    X, y, kw = overflowing(200)
    X[94] = 1e200
    ours, alone = (make(c, shuffle=False, on_divergence=on_divergence, optimizer="adam", **kw)
                   for c in (comm, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = outcome(comm, lambda: ours.fit(X, y, epochs=3))
        expected = outcome(comm, lambda: alone.fit(X, y, epochs=3))
    assert got[0][0] == ("DivergenceError" if on_divergence == "raise" else None)
    assert got == expected
    assert ours.optimizer.step_count == alone.optimizer.step_count == 2
    assert np.isfinite(ours.net.params).all()
    assert_same_on_every_rank(comm, ours)
    assert_close(ours.net.params, alone.net.params, np.float64)


def test_divergence_warning_that_one_rank_turns_into_an_error_stops_every_rank(comm):
    X, y, kw = overflowing(200)
    X[94] = 1e200
    trainer = make(comm, shuffle=False, on_divergence="warn", optimizer="adam", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if comm.rank == last(comm) else "ignore", RuntimeWarning)
        got = outcome(comm, lambda: trainer.fit(X, y, epochs=3))
    assert got[last(comm)][0] == "RuntimeWarning"
    assert all(kind == "DistributedError" for kind, _ in got[:-1])
    assert_same_on_every_rank(comm, trainer)


def test_nonfinite_loss_in_one_shard_stops_every_rank(comm):
    X, y, kw = overflowing(60 + 10 * comm.rank, seed=comm.rank)
    if comm.rank == last(comm):
        X[5] = 1e200
    trainer = make(comm, shuffle=False, optimizer="adam", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = outcome(comm, lambda: trainer.fit(X, y, epochs=2, sharded=True))
    assert [g[0] for g in got] == ["DivergenceError"] * comm.Get_size()
    assert "after 0 samples" in got[0][1]           # the first batch holds shard row 5
    assert trainer.optimizer.step_count == 0
    assert_same_on_every_rank(comm, trainer)


@pytest.mark.parametrize("phase", ["compiled", "python"])
def test_batch_statistics_overflowing_in_one_shard_leave_finite_running_statistics(comm, monkeypatch, phase):
    # the last shard's second batch: equal rows whose mean overflows BatchNorm's statistics
    # (the loss then diverges); every rank keeps the same finite running statistics
    monkeypatch.setenv("CPROP_MPI_EPOCH", phase)
    X, y = data(64, seed=comm.rank)
    if comm.rank == last(comm):
        X[8:16] = np.finfo(np.float64).max / 4
    trainer = make(comm, shuffle=False, batch_size=8 * comm.Get_size(), on_divergence="warn",
                   optimizer="adam",
                   layers=lambda: [cprop.BatchNorm(8), cprop.Dense(8, 16, "tanh"), cprop.Dense(16, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(X, y, epochs=1, sharded=True)
    assert trainer.epochs_done == 0 and trainer.optimizer.step_count == 1
    assert np.isfinite(trainer.net.buffers).all(), trainer.net.buffers
    assert_same_on_every_rank(comm, trainer)


def test_ctrl_c_on_one_rank_between_epochs_interrupts_every_rank(comm):
    X, y = data(100)
    trainer = make(comm)

    def interrupt(t, epoch, logs):
        if epoch == 2 and comm.rank == last(comm):
            os.kill(os.getpid(), signal.SIGINT)
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=5, callbacks=[interrupt]))
    assert [g[0] for g in got] == ["KeyboardInterrupt"] * comm.Get_size()
    assert trainer.epochs_done == 2 and len(trainer.history) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert_same_on_every_rank(comm, trainer)


def test_ctrl_c_on_one_rank_mid_epoch_interrupts_every_rank_at_the_same_step(comm):
    # epochs of 50,000 steps, far longer than the compiled epoch's 0.05 s between looks at
    # the signal flag (it looks at the last step too), so the signal lands mid-epoch in both
    # phases rather than between epochs
    X, y = data(400_000)
    trainer = make(comm, batch_size=8, optimizer="adam")
    timers = []

    class Interrupt(cprop.callbacks.Callback):
        # the timer starts inside fit, where the fit's SIGINT handler is already installed
        def on_train_begin(self, trainer):
            if comm.rank == last(comm):
                timers.append(threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)))
                timers[0].start()
    comm.Barrier()
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=100_000, callbacks=[Interrupt()]))
    for timer in timers:
        timer.join()
    assert [g[0] for g in got] == ["KeyboardInterrupt"] * comm.Get_size()
    assert 0 < trainer.optimizer.step_count
    assert not trainer.net._has_grads
    assert np.isfinite(trainer.net.params).all()
    assert_same_on_every_rank(comm, trainer)
    # and the trainer trains on afterwards, every rank alike
    trainer.fit(X[:100], y[:100], epochs=1)
    assert_same_on_every_rank(comm, trainer)


def test_callback_error_on_one_rank_raises_on_every_rank(comm):
    X, y = data(100)
    trainer = make(comm)

    def fails(t, epoch, logs):
        if epoch == 2 and comm.rank == last(comm):
            raise ValueError("a callback failed here")
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=4, callbacks=[fails]))
    for r, (kind, message) in enumerate(got):
        if r == last(comm):
            assert (kind, message) == ("ValueError", "a callback failed here")
        else:
            assert kind == "DistributedError"
            expected = f"rank {last(comm)} of {comm.Get_size()} failed (ValueError: a callback failed here)"
            assert expected in message
    assert trainer.epochs_done == 2
    assert_same_on_every_rank(comm, trainer)


def test_callback_stop_on_one_rank_stops_every_rank(comm):
    X, y = data(100)
    trainer = make(comm)
    trainer.fit(X, y, epochs=10, callbacks=[lambda t, epoch, logs: epoch == 3 and comm.rank == 0])
    assert trainer.epochs_done == 3
    assert_same_on_every_rank(comm, trainer)


def test_callback_changing_one_rank_only_is_refused(comm):
    X, y = data(100)
    trainer = make(comm)

    def nudge(t, epoch, logs):
        if comm.rank == last(comm):
            t.optimizer.lr = 0.5
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=3, callbacks=[nudge]))
    assert [g[0] for g in got] == ["RuntimeError"] * comm.Get_size()
    assert "after epoch 1 rank" in got[0][1] and "optimizer settings" in got[0][1]

    def perturb(t, epoch, logs):
        if comm.rank == 0:
            t.net.params[0] += 1e-3
    trainer = make(comm)
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=3, callbacks=[perturb]))
    assert [g[0] for g in got] == ["RuntimeError"] * comm.Get_size()
    assert "other parameters than rank 0" in got[0][1]


def test_differing_settings_or_data_are_refused_on_every_rank(comm):
    X, y = data(100)
    trainer = make(comm, batch_size=32 + (comm.rank == last(comm)))
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1))
    assert [g[0] for g in got] == ["ValueError"] * comm.Get_size()
    assert "batch_size=33" in got[0][1]
    assert trainer.optimizer.step_count == 0

    trainer = make(comm)
    Xr = X + (comm.rank == last(comm))
    got = outcome(comm, lambda: trainer.fit(Xr, y, epochs=1))
    assert [g[0] for g in got] == ["ValueError"] * comm.Get_size()
    assert "sharded=True" in got[0][1]
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1 + (comm.rank == 0)))
    assert [g[0] for g in got] == ["ValueError"] * comm.Get_size()
    assert "has epochs=1, rank 0 has 2" in got[0][1]
    # a difference deep in a long value is named where it is, not cut off before it
    trainer = make(comm, dtype=np.float32 if comm.rank == last(comm) else np.float64)
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1))
    assert [g[0] for g in got] == ["ValueError"] * comm.Get_size()
    assert "has architecture['dtype']='float32', rank 0 has 'float64'" in got[0][1], got[0][1]
    trainer = make(comm, layers=[cprop.Dense(8, 16, "tanh" if comm.rank else "relu"), cprop.Dense(16, 3)])
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1))
    assert "architecture['layers'][0]['activation']='tanh', rank 0 has 'relu'" in got[0][1], got[0][1]


def test_bad_input_on_one_rank_raises_on_every_rank(comm):
    X, y = data(100)
    trainer = make(comm)
    Xr = X[:, :5] if comm.rank == last(comm) else X
    got = outcome(comm, lambda: trainer.fit(Xr, y, epochs=1))
    assert got[last(comm)][0] == "ValueError" and "features" in got[last(comm)][1]
    assert all(kind == "DistributedError" for kind, _ in got[:-1])
    for call in (lambda: trainer.evaluate(Xr, y), lambda: trainer.predict(Xr)):
        got = outcome(comm, call)
        assert got[last(comm)][0] == "ValueError" and all(k == "DistributedError" for k, _ in got[:-1])


@pytest.mark.parametrize("what", ["sample_weight", "lbfgs"])
def test_what_comm_refuses_on_one_rank_is_refused_on_every_rank(comm, what):
    # refused before any collective on that rank alone, the others would wait for it forever
    X, y = data(100)
    odd = comm.rank == last(comm)
    trainer = make(comm)
    if what == "lbfgs" and odd:
        trainer.optimizer = cprop.LBFGS()
    weights = np.ones(100) if what == "sample_weight" and odd else None
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1, sample_weight=weights))
    assert got[last(comm)][0] == "ValueError" and "under comm" in got[last(comm)][1]
    assert all(kind == "DistributedError" for kind, _ in got[:-1])


@pytest.mark.parametrize("everywhere", [False, True], ids=["one_rank", "every_rank"])
def test_sparse_input_under_comm_is_refused_on_every_rank(comm, everywhere):
    sparse = pytest.importorskip("scipy.sparse")
    X, y = data(100)
    odd = everywhere or comm.rank == last(comm)
    Xs = sparse.csr_matrix(X) if odd else X
    trainer = make(comm)
    for call in (lambda: trainer.fit(Xs, y, epochs=1), lambda: trainer.fit(X, y, validation_data=(Xs, y)),
                 lambda: trainer.evaluate(Xs, y), lambda: trainer.predict(Xs)):
        got = outcome(comm, call)
        refused = [kind == "TypeError" and "X.toarray()" in message for kind, message in got]
        assert refused[last(comm)] and all(refused if everywhere else
                                           [kind == "DistributedError" for kind, _ in got[:-1]]), got


def fail_share(monkeypatch, comm, call):
    """On the last rank, its `call`-th share's gradient raises MemoryError("no memory for this share").
    The epoch runs in Python (phase 1) on every rank: nothing inside the compiled one raises."""
    monkeypatch.setenv("CPROP_MPI_EPOCH", "python")
    class Failing:
        calls = 0

        def __getattr__(self, name):
            return getattr(cprop._lazy.core, name)

        def batch_gradient(self, *args, **kwargs):
            Failing.calls += 1
            if Failing.calls == call:
                raise MemoryError("no memory for this share")
            return cprop._lazy.core.batch_gradient(*args, **kwargs)
    if comm.rank == last(comm):
        monkeypatch.setattr(distributed, "_core", Failing())


def test_error_computing_one_share_raises_on_every_rank(comm, monkeypatch):
    # a failure inside a batch (here a MemoryError on the last rank's third share) travels
    # with that batch's allreduce: every rank raises before the step
    fail_share(monkeypatch, comm, 3)
    X, y = data(200)
    trainer = make(comm, optimizer="adam")       # Adam counts its steps
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=1))
    assert got[last(comm)] == ("MemoryError", "no memory for this share")
    assert all(kind == "DistributedError" for kind, _ in got[:-1])
    assert trainer.optimizer.step_count == 2
    assert_same_on_every_rank(comm, trainer)


def test_oversubscribed_threads_are_warned_about(comm):
    X, y = data(50)
    trainer = make(comm)
    trainer.n_threads = len(os.sched_getaffinity(0)) + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(X, y, epochs=1)
    messages = [str(w.message) for w in caught if "Oversubscribed" in str(w.message)]
    node = comm.Split_type(__import__("mpi4py.MPI").MPI.COMM_TYPE_SHARED)
    first_on_node = node.Get_rank() == 0
    node.Free()
    assert len(messages) == (1 if first_on_node else 0)
    if messages:
        assert "--bind-to none" in messages[0] and "--cpus-per-task" in messages[0]


def test_comm_without_mpi_sized_one_or_wrong(comm):
    with pytest.raises(TypeError, match="intra-communicator"):
        make(object())
    with pytest.raises(ValueError, match="sharded=True needs comm"):
        make(None).fit(*data(10), sharded=True)


@pytest.mark.parametrize("phase", ["compiled", "python"])
@pytest.mark.parametrize("which", ["X", "validation X"])
def test_data_memory_swapped_from_a_callback_is_refused_on_every_rank(comm, which, phase, monkeypatch):
    # ndarray.__setstate__ frees an array's memory whatever refers to it: the data the epochs
    # and the validation read are checked before each epoch, agreed between the ranks
    if phase == "python":
        monkeypatch.setenv("CPROP_MPI_EPOCH", "python")
    X, y = data(300)
    Xv, yv = data(100, seed=1)
    trainer = make(comm)
    swapped = X if which == "X" else Xv

    def swap(trainer, epoch, logs):
        swapped.__setstate__((1, (1, 8), np.dtype(np.float64), False, bytes(64)))
    got = outcome(comm, lambda: trainer.fit(X, y, epochs=3, validation_data=(Xv, yv), callbacks=[swap]))
    assert all(name == "RuntimeError" and "memory was replaced" in message for name, message in got)
    assert trainer.epochs_done == 1
    assert np.isfinite(trainer.net.params).all()
