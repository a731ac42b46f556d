"""Training that fails safe: divergence, Ctrl-C, concurrent use from threads, and no copy of X.

After every failure mode here the network's parameters, the optimizer's state and the
history are finite: whatever stopped the training, the model left behind can still be used
and saved.
"""
import concurrent.futures
import importlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import cprop


def assert_all_finite(trainer):
    """Parameters, optimizer state and every history entry are finite; history matches epochs_done."""
    assert np.isfinite(trainer.net.params).all()
    for state in trainer.optimizer.state or []:
        assert np.isfinite(state).all()
    for field, values in trainer.history.as_dict().items():
        assert all(math.isfinite(v) for v in values), (field, values)
    assert len(trainer.history) == trainer.epochs_done


def unscaled_problem(loss, n=200, seed=0):
    """Raw features in the thousands: far too large for an unscaled step of 1e6."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 10)) * 1000
    if loss == "cross_entropy":
        return X, rng.integers(0, 3, n)
    if loss == "binary_cross_entropy":
        return X, rng.integers(0, 2, (n, 3)).astype(np.float64)
    return X, rng.normal(size=(n, 3)) * 1000


def absurd_trainer(loss, dtype, optimizer, on_divergence="raise"):
    net = cprop.Sequential([cprop.Dense(10, 16, "relu"), cprop.Dense(16, 3)], dtype=dtype, seed=0)
    return cprop.Trainer(net, loss=loss, optimizer=optimizer, batch_size=8, seed=0, on_divergence=on_divergence)


ABSURD_OPTIMIZERS = {"SGD lr=1e6": lambda: cprop.SGD(lr=1e6),
                     "SGD lr=1e6 momentum": lambda: cprop.SGD(lr=1e6, momentum=0.9),
                     "SGD lr=1e6 nesterov decay": lambda: cprop.SGD(lr=1e6, momentum=0.5, nesterov=True,
                                                                    weight_decay=0.1)}


# -- divergence ----------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ABSURD_OPTIMIZERS)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_divergence_raises_and_leaves_finite_parameters(dtype, loss, optimizer):
    X, y = unscaled_problem(loss)
    trainer = absurd_trainer(loss, dtype, ABSURD_OPTIMIZERS[optimizer]())

    with pytest.raises(cprop.DivergenceError, match="diverged"):
        trainer.fit(X, y, epochs=20, validation_data=(X, y))

    assert_all_finite(trainer)
    assert trainer.epochs_done < 20


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_divergence_warns_and_stops(dtype, loss):
    X, y = unscaled_problem(loss)
    trainer = absurd_trainer(loss, dtype, cprop.SGD(lr=1e6, momentum=0.9), on_divergence="warn")
    epochs_run = []

    with pytest.warns(RuntimeWarning, match="diverged") as caught:
        history = trainer.fit(X, y, epochs=20, callbacks=[lambda t, epoch, logs: epochs_run.append(epoch)])

    assert [w.filename for w in caught if "diverged" in str(w.message)] == [__file__]   # points at the fit call

    assert history is trainer.history and len(history) < 20
    assert epochs_run == list(range(1, len(history) + 1))        # no callback after the divergence
    assert_all_finite(trainer)


def test_divergence_midway_keeps_the_finite_epochs(tmp_path):
    # two sane epochs, then a learning-rate schedule goes absurd
    X, y = unscaled_problem("mse")
    X, y = X / 1000, y / 1000
    trainer = absurd_trainer("mse", "float32", cprop.SGD(lr=1e-3, momentum=0.9))

    def schedule(t, epoch, logs):
        if epoch == 2:
            t.optimizer.lr = 1e38

    with pytest.raises(cprop.DivergenceError, match="epoch 3"):
        trainer.fit(X, y, epochs=10, callbacks=[schedule])

    assert trainer.epochs_done == 2 and len(trainer.history) == 2
    assert_all_finite(trainer)
    # what is left is a valid model: it saves, and loads back (loading refuses non-finite values)
    trainer.save(tmp_path / "after-divergence.npz")
    assert_array_equal(cprop.Trainer.load(tmp_path / "after-divergence.npz").net.params, trainer.net.params)


@pytest.mark.parametrize("dtype, rows", [("float64", "equal"), ("float64", "alternating"),
                                         ("float32", "alternating")])
def test_batch_statistics_that_overflow_leave_finite_running_statistics(dtype, rows, tmp_path):
    # a batch of finite inputs whose mean (equal rows, float64) or variance overflows: the
    # running statistics its forward pass moves keep their finite values where the new ones
    # are not, whether the loss then diverges (equal rows) or stays finite (alternating)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 4)).astype(dtype), rng.normal(size=(64, 2)).astype(dtype)
    X[40:48] = np.finfo(dtype).max / 4
    if rows == "alternating":
        X[40:48:2] *= -1
    net = cprop.Sequential([cprop.BatchNorm(4), cprop.Dense(4, 8, "relu"), cprop.Dense(8, 2)],
                           dtype=dtype, seed=0)
    trainer = cprop.Trainer(net, batch_size=8, shuffle=False, on_divergence="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # the divergence, for equal rows
        trainer.fit(X, y, epochs=1)
    assert np.isfinite(net.buffers).all(), net.buffers
    assert np.isfinite(net.predict_raw(X[:40])).all()
    trainer.save(tmp_path / "trained.npz")      # a model that saves and loads back
    assert_array_equal(cprop.Trainer.load(tmp_path / "trained.npz").net.buffers, net.buffers)


def test_nan_weights_set_by_hand_are_not_trained_on():
    # a network whose weights the user broke: training stops, nothing non-finite spreads
    X, y = unscaled_problem("cross_entropy")
    trainer = absurd_trainer("cross_entropy", "float32", cprop.SGD(lr=0.01))
    trainer.net.layers[1].W[0, 0] = np.nan

    with pytest.raises(cprop.DivergenceError):
        trainer.fit(X / 1000, y, epochs=2)

    assert np.isnan(trainer.net.params).sum() == 1     # only the one the user put there
    assert trainer.epochs_done == 0


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_step_with_an_overflowing_update_keeps_finite_values(name):
    net = cprop.Sequential([cprop.Dense(4, 3, "tanh"), cprop.Dense(3, 2)], seed=0)
    optimizer = {"SGD": lambda: cprop.SGD(lr=1e30, momentum=0.9), "Adam": lambda: cprop.Adam(lr=1e38),
                 "AdamW": lambda: cprop.AdamW(lr=1e38)}[name]()
    for _ in range(3):
        net.forward(np.ones((3, 4)))
        net.backward(np.full((3, 2), 1e30, dtype=np.float32))
        with pytest.raises(FloatingPointError, match="non-finite"):
            optimizer.step(net)
        assert np.isfinite(net.params).all()
        assert all(np.isfinite(state).all() for state in optimizer.state)


@pytest.mark.parametrize("sklearn_style", [False, True], ids=["torch", "sklearn"])
def test_adams_second_moment_that_overflows_is_a_refused_update(sklearn_style):
    # a gradient of 1e160 (an input row of 1e160, cross-entropy: the loss stays finite):
    # its square overflows Adam's v while the parameter's new value, p - lr·m/√v, is finite;
    # written, v = inf froze that parameter for good, silently
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(64, 4)), rng.integers(0, 3, 64)
    X[10], y[10] = 1e160, 0
    net = cprop.Sequential([cprop.Dense(4, 3)], dtype="float64", seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.Adam(sklearn_style=sklearn_style),
                            batch_size=8, shuffle=False)
    with pytest.raises(cprop.DivergenceError, match="after 8 samples: the update became non-finite"):
        trainer.fit(X, y, epochs=1)
    assert_all_finite(trainer)
    assert trainer.optimizer.step_count == 2      # the refused step counts, as for any refused update


def test_an_exception_in_a_callback_leaves_a_consistent_trainer():
    X, y = unscaled_problem("cross_entropy")
    trainer = absurd_trainer("cross_entropy", "float32", cprop.Adam(lr=1e-3))

    def fail_in_epoch_two(t, epoch, logs):
        if epoch == 2:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        trainer.fit(X / 1000, y, epochs=5, callbacks=[fail_in_epoch_two])

    assert trainer.epochs_done == 2
    assert_all_finite(trainer)


# -- Ctrl-C ----------------------------------------------------------------------------------
# The epoch runs without the GIL; it takes the GIL back every few tens of milliseconds to let
# Python's SIGINT handler raise. The child measures nothing itself but the moment it caught
# KeyboardInterrupt on CLOCK_MONOTONIC, which is one clock for every process on Linux.

INTERRUPTED_FIT = """
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)   # even if SIGINT was ignored by our parent
import numpy as np
import cprop

rng = np.random.default_rng(0)
X = rng.random((20000, 784), dtype=np.float32)     # an MNIST-sized problem: seconds per epoch
y = rng.integers(0, 10, 20000)
net = cprop.Sequential([cprop.Dense(784, 256, "relu"), cprop.Dense(256, 10)], seed=0)
trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.Adam(lr=1e-3), batch_size=64, seed=0)
initial = net.params.copy()
print("READY", flush=True)
try:
    trainer.fit(X, y, epochs=1000)
    result = {"interrupted": False}
except KeyboardInterrupt:
    caught = time.monotonic()
    result = {
        "interrupted": True, "caught": caught,
        "params_finite": bool(np.isfinite(net.params).all()),
        "state_finite": all(bool(np.isfinite(s).all()) for s in trainer.optimizer.state),
        "trained": bool((net.params != initial).any()),
        "epochs_done": trainer.epochs_done, "history": len(trainer.history),
        "history_finite": all(np.isfinite(v).all() for v in trainer.history.as_dict().values()),
        "step_count": trainer.optimizer.step_count,
    }
    # the interrupted trainer carries on
    trainer.fit(X[:640], y[:640], epochs=1)
    result["fit_after"] = bool(np.isfinite(net.params).all())
    result["history_after"] = len(trainer.history)
print(json.dumps(result), flush=True)
"""


def read_line(proc, timeout):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_ctrl_c_stops_a_long_fit_quickly_and_safely(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_FIT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=tmp_path)
    try:
        assert read_line(proc, timeout=60).strip() == "READY", proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(1.0)                                 # well inside the first of many epochs
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the fit was still running 10 s after SIGINT; its stderr:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, f"exit code {proc.returncode}\n{err[-3000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["interrupted"]
    reaction = result["caught"] - sent
    assert 0 <= reaction < 1.0, f"KeyboardInterrupt came {reaction:.3f} s after SIGINT"
    assert result["params_finite"] and result["state_finite"] and result["history_finite"]
    assert result["trained"]                            # it was interrupted mid-training, not before
    assert result["history"] == result["epochs_done"]
    assert result["fit_after"] and result["history_after"] == result["history"] + 1


# -- threads ---------------------------------------------------------------------------------

def test_concurrent_predictions_equal_serial_ones():
    rng = np.random.default_rng(0)
    net = cprop.Sequential([cprop.Dense(32, 128, "relu"), cprop.Dense(128, 64, "tanh"), cprop.Dense(64, 10)],
                           seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy")
    inputs = [rng.normal(size=(int(rng.integers(1, 800)), 32)).astype(np.float32) for _ in range(50)]

    def predict(i):
        # three entries in turn: the raw outputs, the probabilities, the labels
        X = inputs[i]
        return (net.predict_raw(X), trainer.predict_proba(X), trainer.predict(X))[i % 3]

    serial = [predict(i) for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        concurrent_ = list(pool.map(predict, range(50)))

    for expected, got in zip(serial, concurrent_):
        assert got.dtype == expected.dtype
        assert_array_equal(got, expected)


def test_concurrent_forward_and_predict_on_one_model():
    # forward keeps activations for backward; concurrent calls must still return their own outputs
    rng = np.random.default_rng(1)
    net = cprop.Sequential([cprop.Dense(16, 256, "sigmoid"), cprop.Dense(256, 4)], seed=0)
    inputs = [rng.normal(size=(300 + i, 16)) for i in range(50)]
    serial = [net.predict_raw(X) for X in inputs]

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: (net.forward if i % 2 else net.predict_raw)(inputs[i]), range(50)))

    for expected, got in zip(serial, results):
        # forward's products and predict_raw's chunks differ in shape: equal within rounding
        assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def train_one(seed, barrier=None):
    # big enough for the multi-threaded kernels (and to overlap), small enough to take well under 1 s
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(3000, 64)).astype(np.float32)
    y = rng.integers(0, 10, 3000)
    net = cprop.Sequential([cprop.Dense(64, 256, "relu"), cprop.Dense(256, 10)], seed=seed)
    # an explicit thread count: with None, a fit whose threads stall each other (as two
    # fits on two cores may) goes on with one thread, which rounds differently
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.Adam(lr=1e-3),
                            batch_size=256, seed=seed, n_threads=2)
    if barrier is not None:
        barrier.wait()
    trainer.fit(X, y, epochs=4)
    return net.params.copy(), list(trainer.history.loss)


def test_two_models_train_in_parallel_threads_as_they_train_alone():
    alone = [train_one(seed) for seed in (1, 2)]

    barrier = threading.Barrier(2)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(lambda seed: train_one(seed, barrier), (1, 2)))

    for (params_alone, loss_alone), (params_together, loss_together) in zip(alone, together):
        assert_array_equal(params_together, params_alone)
        assert loss_together == loss_alone
    assert not np.array_equal(alone[0][0], alone[1][0])


def test_training_releases_the_gil():
    # a Python thread that wants the GIL every millisecond keeps running while fits run; with a
    # switch interval of 1 s, an epoch that held the GIL would starve it
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(2000, 100)).astype(np.float32), rng.integers(0, 10, 2000)
    net = cprop.Sequential([cprop.Dense(100, 256, "relu"), cprop.Dense(256, 10)], seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", batch_size=500, n_threads=1)
    ticks, done = [], threading.Event()

    def count():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    counter = threading.Thread(target=count)
    try:
        counter.start()
        start = time.perf_counter()
        while time.perf_counter() - start < 0.3:
            trainer.fit(X, y, epochs=1)
        end = time.perf_counter()
    finally:
        done.set()
        counter.join()
        sys.setswitchinterval(previous)
    during = [t for t in ticks if start <= t <= end]
    assert len(during) >= 30, f"{len(during)} ticks in {end - start:.2f} s of training"
    assert np.isfinite(net.params).all()


# -- fit does not copy X -------------------------------------------------------------------------

@pytest.fixture
def spy_on_train_epoch(monkeypatch):
    """The X arrays the compiled epoch was given."""
    seen = []
    core = importlib.import_module("cprop.trainer")._core      # what Trainer.fit calls into
    real = core.train_epoch

    def spy(*args, **kwargs):
        seen.append(args[6])      # train_epoch(table, hyper, row_width, n_bstats, settings, optimizer, X, ...)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "train_epoch", spy)
    return seen


def writable_and_read_only(X, tmp_path):
    memmap = np.memmap(tmp_path / "X.dat", dtype=X.dtype, mode="w+", shape=X.shape)
    memmap[...] = X
    memmap.flush()
    return [X, np.memmap(tmp_path / "X.dat", dtype=X.dtype, mode="r", shape=X.shape)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_passes_a_matching_x_to_the_kernel_uncopied(dtype, spy_on_train_epoch, tmp_path):
    rng = np.random.default_rng(0)
    for X in writable_and_read_only(rng.normal(size=(300, 20)).astype(dtype), tmp_path):
        net = cprop.Sequential([cprop.Dense(20, 8, "relu"), cprop.Dense(8, 3)], dtype=dtype, seed=0)
        trainer = cprop.Trainer(net, loss="cross_entropy", batch_size=32, seed=0)
        spy_on_train_epoch.clear()

        trainer.fit(X, rng.integers(0, 3, 300), epochs=2)

        assert len(spy_on_train_epoch) == 2
        for seen in spy_on_train_epoch:
            assert np.shares_memory(seen, X) and seen.shape == X.shape


def test_fit_converts_other_x_once(spy_on_train_epoch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20))            # float64 for a float32 network: one conversion
    net = cprop.Sequential([cprop.Dense(20, 3)], seed=0)

    cprop.Trainer(net, loss="cross_entropy").fit(X, rng.integers(0, 3, 300), epochs=3)

    assert len(spy_on_train_epoch) == 3
    assert all(seen is spy_on_train_epoch[0] for seen in spy_on_train_epoch)
    assert spy_on_train_epoch[0].dtype == np.float32 and spy_on_train_epoch[0].flags.c_contiguous


def test_fit_memory_stays_far_below_the_size_of_x():
    # What a fit needs besides X (labels, the shuffled order, a workspace for one batch, the
    # history, a temporary mask for the finiteness check) is a fraction of X; a copy of X, even
    # in float16, would be at least half its size. NumPy reports its buffers to tracemalloc.
    rng = np.random.default_rng(0)
    X = rng.random((20000, 100), dtype=np.float32)
    y = rng.integers(0, 10, 20000)
    net = cprop.Sequential([cprop.Dense(100, 16, "relu"), cprop.Dense(16, 10)], seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", batch_size=64, seed=0)
    trainer.fit(X[:100], y[:100])        # first call's imports and caches out of the way

    tracemalloc.start()
    try:
        trainer.fit(X, y, epochs=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < X.nbytes / 2, f"fit allocated {peak / 1e6:.1f} MB for an X of {X.nbytes / 1e6:.1f} MB"


def test_tracemalloc_would_see_a_copy_of_x():
    # the control for the test above: a copy of X does show up
    X = np.random.default_rng(0).random((20000, 100), dtype=np.float32)
    tracemalloc.start()
    try:
        X.astype(np.float64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= X.nbytes


# -- any exception a signal handler raises mid-epoch ---------------------------------------

class HandlerError(Exception):
    pass


@pytest.mark.parametrize("raised", [HandlerError, SystemExit])
def test_an_exception_from_a_signal_handler_mid_epoch_leaves_adams_count_with_its_steps(raised):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20000, 32)), rng.normal(size=(20000, 2))
    net = cprop.Sequential([cprop.Dense(32, 64, "relu"), cprop.Dense(64, 2)], dtype="float64", seed=0)
    opt = cprop.Adam(lr=1e-4)
    trainer = cprop.Trainer(net, optimizer=opt, batch_size=1, seed=0, n_threads=1)
    epoch_steps = X.shape[0]

    def handler(signum, frame):
        if cprop._threads.epoch_network() is net:    # inside the compiled epoch
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            raise raised("from a handler")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
    try:
        with pytest.raises(raised):
            trainer.fit(X, y, epochs=1000)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    # the interrupted epoch took steps (the handler runs after one): Adam counts them
    assert opt.step_count > trainer.epochs_done * epoch_steps
    assert not net._has_grads
    assert_all_finite(trainer)
    trainer.fit(X[:100], y[:100])        # and training goes on from there


def test_an_exception_from_a_signal_handler_mid_lbfgs_leaves_the_last_iterate(monkeypatch):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(2000, 16)), rng.normal(size=(2000, 2))
    net = cprop.Sequential([cprop.Dense(16, 32, "tanh"), cprop.Dense(32, 2)], dtype="float64", seed=0)
    opt = cprop.LBFGS(max_iter=10**6)
    trainer = cprop.Trainer(net, optimizer=opt, seed=0)
    iterates = [net.params.copy()]
    evaluations = {"n": 0}
    original = net._batch_gradient

    def counting(*args, **kw):
        evaluations["n"] += 1
        if evaluations["n"] == 25:
            raise HandlerError("raised at a trial point")     # as a signal handler may
        return original(*args, **kw)

    monkeypatch.setattr(net, "_batch_gradient", counting)
    import scipy.optimize
    real_minimize = scipy.optimize.minimize

    def recording_minimize(*args, callback=None, **kw):
        def record(intermediate_result):
            iterates.append(intermediate_result.x.copy())
            return callback(intermediate_result)
        return real_minimize(*args, callback=record, **kw)

    monkeypatch.setattr(scipy.optimize, "minimize", recording_minimize)
    with pytest.raises(HandlerError):
        trainer.fit(X, y)
    assert len(iterates) > 1
    assert_array_equal(net.params, iterates[-1].astype(net.dtype))
    assert not net._has_grads


# -- save writes nothing load refuses -------------------------------------------------------

def bn_trainer():
    net = cprop.Sequential([cprop.Dense(4, 8, "relu"), cprop.BatchNorm(8), cprop.Dense(8, 2)],
                           dtype="float64", seed=0)
    return cprop.Trainer(net, seed=0)


def nested(levels):
    value = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("attack, message", [
    (lambda t: setattr(t, "dropout_seed", 2**63 + 5), "dropout_seed"),
    (lambda t: setattr(t, "epochs_done", -1), "epochs_done"),
    (lambda t: t.extra.update(notes=nested(40)), "nested deeper"),
    (lambda t: t.extra.update(notes=10**50), "digits"),
    (lambda t: t.extra.update(notes=np.int64(3)), "JSON serializable"),
    (lambda t: t.history.loss.append("1.5"), "history"),
    (lambda t: t.net.layers[1].running_var.__setitem__(0, -1.0), "variance is negative"),
    (lambda t: t.net.buffers.__setitem__(0, np.inf), "not finite"),
])
def test_save_refuses_what_load_would_refuse(tmp_path, attack, message):
    trainer = bn_trainer()
    attack(trainer)
    path = tmp_path / "t.npz"
    with pytest.raises(ValueError, match=message):
        trainer.save(path)
    assert list(tmp_path.iterdir()) == []      # nothing written, no temporary left
    if "variance" in message or "finite" in message:
        with pytest.raises(ValueError, match=message):
            trainer.net.save(path)


def test_a_trainer_at_the_limits_saves_and_loads(tmp_path):
    trainer = bn_trainer()
    trainer.dropout_seed, trainer.extra["notes"] = 2**63, nested(30)   # 32 levels with the file's own
    trainer.save(tmp_path / "t.npz")
    loaded = cprop.Trainer.load(tmp_path / "t.npz")
    assert loaded.dropout_seed == 2**63 and loaded.extra == trainer.extra


@pytest.mark.parametrize("kind", ["network", "trainer"])
def test_a_file_with_a_negative_running_variance_is_refused(tmp_path, kind):
    trainer = bn_trainer()
    path = tmp_path / "bad.npz"
    (trainer if kind == "trainer" else trainer.net).save(path)
    meta, arrays = cprop.io.load_archive(path)
    arrays["buffers"][8] = -0.5                  # running_var[0] of the BatchNorm
    cprop.io.save_archive(path, {k: v for k, v in meta.items() if k != "members"}, arrays)
    with pytest.raises(cprop.CpropFileError, match="variance is negative"):
        cprop.load(path)
    if kind == "trainer":
        with pytest.raises(cprop.CpropFileError, match="variance is negative"):
            cprop.Trainer.load(path)


@pytest.mark.parametrize("stat, value, message", [("running_mean", np.inf, "infinite"),
                                                  ("running_var", -1.0, "variance is negative"),
                                                  ("running_var", np.nan, "NaN")])
def test_from_torch_refuses_running_statistics_cprop_would_not_load(stat, value, message):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    getattr(module[1], stat)[0] = value
    with pytest.raises(ValueError, match=message):
        cprop.Sequential.from_torch(module)


# -- parameter values checked in the network's dtype ----------------------------------------

@pytest.mark.parametrize("assign", [
    lambda net, v: net.set_params(np.full(net.n_params, v)),
    lambda net, v: setattr(net.layers[0], "W", np.full((2, 3), v)),
    lambda net, v: setattr(net.layers[0], "b", np.full(3, v)),
    lambda net, v: setattr(net.layers[1], "gamma", np.full(3, v)),
    lambda net, v: cprop.Sequential.from_architecture(net.architecture(), buffers=np.full(6, v)),
])
def test_float32_parameters_that_overflow_on_the_cast_are_refused(assign):
    net = cprop.Sequential([cprop.Dense(2, 3), cprop.BatchNorm(3), cprop.Dense(3, 1)], seed=0)
    before = net.params.copy()
    with pytest.raises(ValueError, match="beyond the range of float32"):
        assign(net, 1e300)
    assert_array_equal(net.params, before)
    assign(net, 1e30)                   # large but representable: accepted
    assign(net.astype("float64"), 1e300)


# -- scikit-learn estimators adopting user-set coefs_ / intercepts_ -------------------------

def fitted_classifier():
    pytest.importorskip("sklearn")
    import warnings

    from cprop.sklearn import MLPClassifier
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # not converged in 5 iterations
        return MLPClassifier(hidden_layer_sizes=(8,), max_iter=5, random_state=0).fit(X, y), X, y


@pytest.mark.parametrize("use", ["predict", "warm_start", "partial_fit"])
@pytest.mark.parametrize("attack, message", [
    (lambda m: m.coefs_.__setitem__(0, np.where(np.eye(4, 8) > 0, np.nan, m.coefs_[0])), "NaN"),
    (lambda m: m.intercepts_.__setitem__(1, np.full(3, np.inf)), "infinite"),
    (lambda m: (m.coefs_.__setitem__(1, np.ones((8, 5))), m.intercepts_.__setitem__(1, np.zeros(5))),
     "5 outputs.*n_outputs_=3"),
    (lambda m: (m.coefs_.__setitem__(0, np.ones((6, 8)))), "6 inputs.*n_features_in_=4"),
])
def test_sklearn_refuses_to_adopt_coefs_that_do_not_fit(use, attack, message):
    model, X, y = fitted_classifier()
    before = model._net.params.copy()
    model.coefs_, model.intercepts_ = list(model.coefs_), list(model.intercepts_)
    attack(model)
    with pytest.raises(ValueError, match=message):
        if use == "predict":
            model.predict(X)
        elif use == "warm_start":
            model.set_params(warm_start=True).fit(X, y)
        else:
            model.partial_fit(X, y)
    assert_array_equal(model._net.params, before)      # the fitted network is kept


def test_sklearn_still_adopts_valid_coefs():
    model, X, _ = fitted_classifier()
    coefs = [c * 2 for c in model.coefs_]
    intercepts = [b + 1 for b in model.intercepts_]
    model.coefs_, model.intercepts_ = coefs, intercepts
    hidden = np.maximum(X @ coefs[0] + intercepts[0], 0)
    assert_array_equal(model.predict(X), model.classes_[np.argmax(hidden @ coefs[1] + intercepts[1], axis=1)])


# -- files written atomically, with the umask's permissions ---------------------------------

@pytest.fixture
def model_and_data(tmp_path):
    rng = np.random.default_rng(0)
    net = cprop.Sequential([cprop.Dense(3, 4, "relu"), cprop.Dense(4, 2)], dtype="float64", seed=0)
    cprop.Trainer(net, loss="cross_entropy").save(tmp_path / "model.npz")
    data = tmp_path / "data.csv"
    np.savetxt(data, rng.normal(size=(5, 3)), delimiter=",", header="a,b,c", comments="")
    return str(tmp_path / "model.npz"), str(data)


def test_cli_predict_out_is_atomic_and_names_the_file(tmp_path, model_and_data, monkeypatch, capsys):
    from cprop.__main__ import main
    out = tmp_path / "predictions.txt"
    out.write_text("previous predictions\n")
    real_replace = os.replace

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    assert main(["predict", *model_and_data, "--out", str(out)]) == 1
    assert f"--out {str(out)!r}" in capsys.readouterr().err
    assert out.read_text() == "previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "model.npz", "predictions.txt"]
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(["predict", *model_and_data, "--out", str(out), "--quiet"]) == 0
    assert len(out.read_text().split()) == 5


@pytest.mark.parametrize("writer", ["onnx", "predict"])
def test_exports_get_the_umask_mode_and_write_through_a_symlink(tmp_path, model_and_data, writer, capsys):
    if writer == "onnx":
        pytest.importorskip("onnx")
    from cprop.__main__ import main

    def write(path):
        if writer == "onnx":
            cprop.Trainer.load(model_and_data[0]).net.to_onnx(path)
        else:
            assert main(["predict", *model_and_data, "--out", str(path), "--quiet"]) == 0

    previous = os.umask(0o022)
    try:
        new = tmp_path / "new.out"
        write(new)
        assert (os.stat(new).st_mode & 0o777) == 0o644
        target, link = tmp_path / "target.out", tmp_path / "link.out"
        target.write_text("old")
        os.chmod(target, 0o640)
        link.symlink_to(target)
        write(link)
        assert link.is_symlink() and target.read_bytes() != b"old"
        assert (os.stat(target).st_mode & 0o777) == 0o640       # an existing file keeps its mode
    finally:
        os.umask(previous)


# -- the command line's integers ------------------------------------------------------------

@pytest.mark.parametrize("hidden", ["", ",,", "64,", ",64", "٣", "1_0", "+8", "8,x", " "])
def test_cli_refuses_hidden_widths_that_are_not_ascii_integers(model_and_data, hidden, tmp_path, capsys):
    from cprop.__main__ import main
    data = tmp_path / "train.csv"
    rng = np.random.default_rng(0)
    np.savetxt(data, np.column_stack([rng.normal(size=(20, 3)), rng.integers(0, 2, 20)]), delimiter=",",
               header="a,b,c,t", comments="")
    out = tmp_path / "m.npz"
    assert main(["train", str(data), "--target", "t", "--hidden", hidden, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--hidden" in err and repr(hidden) in err and not out.exists()
    with pytest.raises(SystemExit, match="2"):       # argparse's own refusal
        main(["train", str(data), "--target", "t", "--epochs", "٣", "--out", str(out)])
    assert "--epochs" in capsys.readouterr().err


@pytest.mark.parametrize("batch_size", ["3000000000", "300000000"])
def test_cli_blames_an_oversized_batch_size_not_the_hidden_widths(tmp_path, batch_size, capsys, monkeypatch):
    from cprop import _cli_data
    from cprop.__main__ import main
    monkeypatch.setattr(_cli_data, "available_memory", lambda: 16 * 2**30)
    data = tmp_path / "train.csv"
    rng = np.random.default_rng(0)
    np.savetxt(data, np.column_stack([rng.normal(size=(20, 3)), rng.integers(0, 2, 20)]), delimiter=",",
               header="a,b,c,t", comments="")
    assert main(["train", str(data), "--target", "t", "--batch-size", batch_size,
                 "--out", str(tmp_path / "m.npz")]) == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and f"{int(batch_size):,}" in err and "--hidden" not in err


# -- sample weights of any scale ------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1e-30, 1e-40, 1e-50, 1e-300, 1e30, 1e300])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lbfgs"])
def test_uniform_sample_weights_of_any_scale_train_as_unit_weights(dtype, scale, optimizer):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(100, 4)), rng.normal(size=(100, 2))
    relative = rng.uniform(0.5, 2.0, 100)
    fits = []
    for weights in (relative, relative * scale):
        net = cprop.Sequential([cprop.Dense(4, 8, "tanh"), cprop.Dense(8, 2)], dtype=dtype, seed=0)
        opt = {"sgd": lambda: cprop.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
               "adam": lambda: cprop.Adam(lr=0.01), "lbfgs": lambda: cprop.LBFGS(max_iter=20)}[optimizer]()
        cprop.Trainer(net, optimizer=opt, batch_size=10, seed=0).fit(X, y, epochs=2, sample_weight=weights)
        fits.append(net.params)
    tolerance = 1e-4 if dtype == "float32" else 1e-9
    assert_allclose(fits[1], fits[0], rtol=tolerance, atol=tolerance)


def test_a_decay_per_sample_still_divides_by_the_weights_as_given():
    # decay_per_sample's Σ w is that of the weights passed (as scikit-learn's L2 term):
    # doubling every weight halves the decay, exactly as before normalisation
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 1))
    results = []
    for weights, decay in ((np.full(40, 2.0), 1e-2), (np.ones(40), 5e-3)):
        net = cprop.Sequential([cprop.Dense(3, 1)], dtype="float64", seed=0)
        opt = cprop.SGD(lr=0.1, weight_decay=decay)
        opt.decay_per_sample = True
        cprop.Trainer(net, optimizer=opt, batch_size=40, shuffle=False).fit(X, y, epochs=3, sample_weight=weights)
        results.append(net.params)
    assert_allclose(results[0], results[1], rtol=1e-12)


@pytest.mark.parametrize("state", [
    lambda n: [np.zeros(n), np.zeros(n), np.zeros(n)],       # three arrays for Adam's two
    lambda n: [np.zeros(n + 1), np.zeros(n + 1)],
    lambda n: [np.zeros(n), np.full(n, np.nan)],
    lambda n: [np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)],
    lambda n: 7,
])
def test_save_refuses_optimizer_state_load_would_refuse(tmp_path, state):
    trainer = bn_trainer()
    trainer.optimizer = cprop.Adam()
    trainer.fit(np.ones((8, 4)), np.ones((8, 2)))
    trainer.optimizer.state = state(trainer.net.n_params)
    with pytest.raises(ValueError, match="optimizer's state"):
        trainer.save(tmp_path / "t.npz")
    trainer.optimizer.reset()
    trainer.save(tmp_path / "t.npz")
    cprop.Trainer.load(tmp_path / "t.npz")
