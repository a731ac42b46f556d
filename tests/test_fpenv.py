"""Subnormal numbers: flushed to zero inside cprop's compiled passes by default, IEEE
gradual underflow when asked (set_flush_denormals(False)), and never outside them."""
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cprop
from cprop.bench.workloads import WORKLOADS

pytestmark = pytest.mark.skipif(not cprop._fpenv._core.FLUSH_SUPPORTED,
                                reason="this CPU architecture has no flush-to-zero mode")

# a normal number whose square is subnormal, per dtype
SMALL = {np.float32: 1e-20, np.float64: 1e-160}


@pytest.fixture(params=[True, False], ids=["flush", "ieee"])
def flush(request):
    saved = cprop.get_flush_denormals()
    cprop.set_flush_denormals(request.param)
    yield request.param
    cprop.set_flush_denormals(saved)


def identity_net(dtype, n_in=64, n_out=64):
    """One Dense identity layer whose every output for an all-SMALL input is subnormal:
    W = SMALL, b = 0, so (X·W)[i, j] = n_in × SMALL²."""
    net = cprop.Sequential([cprop.Dense(n_in, n_out)], dtype=dtype, seed=0)
    net.layers[0].W[...] = SMALL[dtype]
    net.layers[0].b[...] = 0
    return net


def subnormal_count(a):
    a = np.abs(np.asarray(a))
    return int(np.count_nonzero((a > 0) & (a < np.finfo(a.dtype).tiny)))


def assert_numpy_still_ieee(dtype):
    """The calling thread's mode came back: NumPy's own arithmetic still underflows gradually."""
    half_tiny = np.finfo(dtype).tiny * dtype(0.5)
    assert half_tiny > 0 and subnormal_count([half_tiny]) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_inference_flushes_subnormal_outputs_and_only_when_asked(flush, dtype, n_threads):
    net = identity_net(dtype)
    X = np.full((4000, 64), SMALL[dtype], dtype=dtype)
    expected = X @ np.asarray(net.layers[0].W)
    assert subnormal_count(expected) == expected.size    # NumPy: IEEE, every value subnormal
    for out in (net.predict_raw(X, n_threads=n_threads), net.forward(X, n_threads=n_threads)):
        if flush:
            assert np.count_nonzero(out) == 0
        else:
            np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                       atol=0)
    assert_numpy_still_ieee(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_and_step_flush_subnormal_gradients(flush, dtype):
    # dW = Xᵀ·G with X and G both SMALL: subnormal; SGD without momentum, lr 1: W -= dW
    net = identity_net(dtype, n_in=8, n_out=4)
    X = np.full((16, 8), SMALL[dtype], dtype=dtype)
    net.forward(X, training=True)
    net.backward(np.full((16, 4), SMALL[dtype], dtype=dtype))
    dW = np.asarray(net.layers[0].dW)
    assert (np.count_nonzero(dW) == 0) if flush else (subnormal_count(dW) == dW.size)
    assert_numpy_still_ieee(dtype)


def test_training_keeps_no_subnormal_momentum_when_flushing(flush):
    # The tiny benchmark network: units that die leave momentum decaying as v ← 0.9·v into the
    # subnormal range, where it sticks (0.9 × the smallest subnormal rounds back to it).
    workload = WORKLOADS["tiny"]
    X, y = workload.make_data(100_000)
    trainer = workload.trainer(n_threads=1)
    trainer.fit(X, y, epochs=1)
    velocity = np.concatenate([np.ravel(v) for v in trainer.optimizer._state])
    assert np.all(np.isfinite(velocity))
    if flush:
        assert subnormal_count(velocity) == 0
    else:
        assert subnormal_count(velocity) > 0, "the workload no longer makes subnormal momentum"
    assert_numpy_still_ieee(np.float32)


def test_flushing_changes_training_only_below_the_normal_range():
    workload = WORKLOADS["tiny"]
    X, y = workload.make_data(20_000)
    saved = cprop.get_flush_denormals()
    results = {}
    try:
        for flush in (True, False):
            cprop.set_flush_denormals(flush)
            trainer = workload.trainer(n_threads=1)
            results[flush] = trainer.fit(X, y, epochs=2).loss, trainer.net._params.copy()
    finally:
        cprop.set_flush_denormals(saved)
    (loss_flush, params_flush), (loss_ieee, params_ieee) = results[True], results[False]
    np.testing.assert_allclose(loss_flush, loss_ieee, rtol=1e-6)
    np.testing.assert_allclose(params_flush, params_ieee, rtol=0, atol=1e-30)


def test_flush_is_the_default_and_set_validates():
    assert cprop.get_flush_denormals() is True
    with pytest.raises(TypeError, match="True or False, got 1"):
        cprop.set_flush_denormals(1)
    with pytest.raises(TypeError, match="got 'no'"):
        cprop.set_flush_denormals("no")
    assert cprop.get_flush_denormals() is True
    assert cprop.show_config(file=open("/dev/null", "w"))["denormals"].startswith("flushed")


def test_openmp_threads_born_in_a_pass_do_not_keep_flushing():
    # backward as the process's first team: libgomp's workers inherit their creator's mode
    code = textwrap.dedent("""
        import numpy as np, cprop
        net = cprop.Sequential([cprop.Dense(256, 256, activation="relu"), cprop.Dense(256, 256)],
                               dtype=np.float64, seed=0)
        X = np.random.default_rng(0).normal(size=(4096, 256))
        net.forward(X, training=True, n_threads=1)
        net.backward(np.ones((4096, 256)), n_threads=2)
        cprop.set_flush_denormals(False)
        lin = cprop.Sequential([cprop.Dense(64, 64)], dtype=np.float64, seed=0)
        lin.layers[0].W[...] = 1e-160
        lin.layers[0].b[...] = 0
        out = lin.predict_raw(np.full((4000, 64), 1e-160), n_threads=2)
        print(int(np.count_nonzero(out == 0)))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_a_caller_that_flushes_gets_ieee_passes_when_cprop_does_not_flush():
    # the caller's own mode (here torch.set_flush_denormal(True), which sets the calling
    # thread's FTZ/DAZ) does not leak into cprop's passes: with set_flush_denormals(False)
    # every thread of a pass underflows gradually, libgomp's workers created while the
    # caller flushed too, and after the caller stops flushing
    pytest.importorskip("torch")
    code = textwrap.dedent("""
        import numpy as np, torch, cprop
        net = cprop.Sequential([cprop.Dense(64, 64)], dtype=np.float64, seed=0)
        net.layers[0].W[...] = 1e-160
        net.layers[0].b[...] = 0
        X = np.full((4000, 64), 1e-160)
        cprop.set_flush_denormals(False)
        if not torch.set_flush_denormal(True):
            print("skip"); raise SystemExit
        assert np.float64(1e-310) * 1 == 0          # the caller flushes now
        # zeros counted by their bits: NumPy's == 0 would read subnormals as 0 in this thread
        def zeros(out):
            return int(np.count_nonzero(out.view(np.int64) == 0))
        counts = [zeros(net.predict_raw(X, n_threads=t)) for t in (2, 1, 2)]
        torch.set_flush_denormal(False)
        counts += [zeros(net.predict_raw(X, n_threads=t)) for t in (2, 1)]
        assert np.float64(1e-310) * 1 != 0
        print(counts)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if result.stdout.strip() == "skip":
        pytest.skip("torch cannot set flush-to-zero on this CPU")
    assert result.stdout.strip() == "[0, 0, 0, 0, 0]"


def test_signal_handlers_run_mid_epoch_keep_ieee():
    # the epoch takes the GIL every 0.05 s to run Python's signal handlers: in IEEE mode
    seen = []
    previous = signal.signal(signal.SIGALRM, lambda *_: seen.append(subnormal_count(
        [np.finfo(np.float64).tiny * 0.5]) == 1))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200_000, 64)).astype(np.float32)
    y = rng.integers(0, 10, 200_000)
    net = cprop.Sequential([cprop.Dense(64, 256, activation="relu"), cprop.Dense(256, 10)],
                           dtype=np.float32, seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.01), n_threads=1)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
        trainer.fit(X, y, epochs=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert seen and all(seen)


def test_trainer_refuses_an_adam_eps_that_flushing_reads_as_zero():
    net = cprop.Sequential([cprop.Dense(4, 1)], dtype=np.float32, seed=0)
    with pytest.raises(ValueError, match=r"eps=1e-40 is below the smallest normal float32 number"):
        cprop.Trainer(net, loss="mse", optimizer=cprop.Adam(eps=1e-40))
    saved = cprop.get_flush_denormals()
    cprop.set_flush_denormals(False)
    try:   # IEEE arithmetic keeps it, and float64 has room for it
        cprop.Trainer(net, loss="mse", optimizer=cprop.Adam(eps=1e-40))
    finally:
        cprop.set_flush_denormals(saved)
    cprop.Trainer(net.astype("float64"), loss="mse", optimizer=cprop.Adam(eps=1e-40))
