"""Memory safety from ordinary Python: what users can do to a network, a trainer or an
optimizer (set attributes, reshape arrays, act from callbacks or other threads) gives a
clear exception or correct results, never a kernel reading or writing out of bounds.

Cases that crashed the process once run in a subprocess, so that a regression fails
the test instead of killing pytest.
"""
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import cprop

import reference as ref
from conftest import activations_of, flat, layers_of


def small_net(sizes=(16, 32, 2), seed=0, dtype="float64"):
    layers = [cprop.Dense(sizes[i], sizes[i + 1], "relu" if i < len(sizes) - 2 else None)
              for i in range(len(sizes) - 1)]
    return cprop.Sequential(layers, dtype=dtype, seed=seed)


def run_python(code, timeout=300):
    """Run `code` in a fresh interpreter; its CompletedProcess (a crash is a negative returncode)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


# -- structure is fixed once built ---------------------------------------------------

@pytest.mark.parametrize("name, value", [("n_in", 1), ("n_out", 1), ("activation", "sigmoid"),
                                         ("activation_code", 3)])
def test_layer_structure_is_read_only(name, value):
    net = small_net()
    with pytest.raises(AttributeError, match=f"Dense.{name} is fixed"):
        setattr(net.layers[0], name, value)
    assert net.layers[0].n_out == 32 and net.layers[0].activation == "relu"


@pytest.mark.parametrize("name", ["layers", "sizes", "activations", "dtype", "params", "grads"])
def test_network_structure_is_read_only(name):
    net = small_net()
    with pytest.raises(AttributeError, match=f"Sequential.{name} is fixed"):
        setattr(net, name, getattr(net, name))


def test_sizes_and_activations_cannot_be_written_through():
    net = small_net()
    for array in (net.sizes, net.activations):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 1
        with pytest.raises(ValueError):
            array.flags.writeable = True
    assert list(net.sizes) == [16, 32, 2]


def test_layer_list_cannot_change():
    net = small_net()
    assert isinstance(net.layers, tuple)
    with pytest.raises(AttributeError):
        net.layers.pop()


def test_reshaping_a_parameter_view_in_place_changes_nothing_the_kernels_see(rng):
    # NumPy lets anyone set .shape on a view; cprop hands kernels its own arrays
    net = small_net((16, 2), dtype="float64")
    X = rng.normal(size=(5, 16))
    expected = net.forward(X)
    W = net.layers[0].W
    W.shape = (2, 16)
    params = net.params
    params.shape = (2, -1)

    assert net.layers[0].W.shape == (16, 2) and net.params.ndim == 1
    assert_array_equal(net.forward(X), expected)
    assert_allclose(net.predict_raw(X), expected, rtol=1e-12)
    net.backward(np.ones((5, 2)))
    assert net.layers[0].dW.shape == (16, 2)


def test_assigning_parameters_still_copies_values_in(rng):
    net = small_net((3, 2))
    W = rng.normal(size=(3, 2))
    net.layers[0].W = W
    net.layers[0].b = [1.0, 2.0]
    assert_array_equal(net.layers[0].W, W)
    assert_array_equal(net.params[-2:], [1.0, 2.0])
    with pytest.raises(ValueError):
        net.layers[0].W = np.ones((2, 3))


def test_the_same_layer_twice_is_refused():
    layer = cprop.Dense(4, 4, "relu")
    with pytest.raises(ValueError, match="same Dense object"):
        cprop.Sequential([layer, layer])
    net = cprop.Sequential([layer])          # still usable, once
    with pytest.raises(ValueError, match="already belongs to a network"):
        cprop.Sequential([layer])
    assert net.n_params == 20


def test_a_forward_that_fails_halfway_leaves_nothing_for_backward(rng, monkeypatch):
    net = small_net((4, 8, 8, 2))
    X = rng.normal(size=(6, 4))
    net.forward(X)                           # a complete forward first: its tape must not survive

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the pass")

    monkeypatch.setattr(cprop.network._core, "forward_train", out_of_memory)
    with pytest.raises(MemoryError):
        net.forward(X)
    with pytest.raises(RuntimeError, match="completed forward"):
        net.backward(np.ones((6, 2)))
    assert np.isfinite(net.grads).all()


def test_structure_attacks_in_a_subprocess_do_not_crash():
    # each of these crashed the process (SIGSEGV or glibc abort) when kernels trusted attributes
    proc = run_python("""
        import numpy as np, cprop
        def attempt(f):
            try:
                f()
            except Exception as exc:
                print(type(exc).__name__)
        net = cprop.Sequential([cprop.Dense(16, 2)], seed=0)
        X = np.ones((4, 16), np.float32)
        attempt(lambda: setattr(net.layers[0], "n_out", 1))
        W = net.layers[0].W; W.shape = (2, 16)
        out = net.forward(X); net.backward(np.ones_like(out))
        def write_sizes(): net.sizes[0] = 1000
        attempt(write_sizes)
        trainer = cprop.Trainer(net, loss="mse", batch_size=2)
        trainer.fit(X, np.zeros((4, 2)), epochs=2)
        assert np.isfinite(net.params).all()
        print("survived")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "survived"


# -- a trainer's settings while fit runs --------------------------------------------------

@pytest.mark.parametrize("name, value", [("loss", "cross_entropy"), ("batch_size", 1000),
                                         ("shuffle", False), ("loss_scale", 5.0)])
def test_changing_fit_settings_from_a_callback_raises(name, value, rng):
    net = small_net((4, 8, 2))
    trainer = cprop.Trainer(net, loss="mse", batch_size=4)
    X, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))

    def meddle(trainer, epoch, logs):
        setattr(trainer, name, value)

    with pytest.raises(RuntimeError, match=f"cannot change trainer.{name} while fit"):
        trainer.fit(X, y, epochs=3, callbacks=[meddle])
    assert trainer.epochs_done == 1 and np.isfinite(net.params).all()
    setattr(trainer, name, value)             # between fits it is allowed


def test_swapping_the_network_or_optimizer_mid_fit_raises(rng):
    net = small_net((4, 8, 2))
    trainer = cprop.Trainer(net, loss="mse", optimizer=cprop.Adam(), batch_size=4)
    X, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    bigger = small_net((4, 512, 512, 2))
    for name, value in (("net", bigger), ("optimizer", cprop.SGD())):
        with pytest.raises(RuntimeError, match=f"trainer.{name}"):
            trainer.fit(X, y, epochs=2, callbacks=[lambda t, e, logs, name=name, value=value: setattr(t, name, value)])
    assert trainer.net is net


def test_optimizer_hyper_parameters_may_change_mid_fit(rng):
    # what schedules do: the next epoch uses the new value
    net = small_net((4, 8, 2))
    trainer = cprop.Trainer(net, loss="mse", optimizer=cprop.SGD(lr=0.01), batch_size=4)
    X, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    trainer.fit(X, y, epochs=3, callbacks=[lambda t, e, logs: setattr(t.optimizer, "lr", 0.0)])
    after_first = trainer.history.loss
    assert after_first[1] == pytest.approx(after_first[2])    # lr 0: nothing moves


def test_optimizer_structure_attacks_are_refused_or_harmless(rng):
    net = small_net((4, 8, 2))
    X, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    opt = cprop.SGD(lr=0.01)                 # no momentum: a 1-element state placeholder
    with pytest.raises(AttributeError):
        opt.kind = cprop.Adam().kind
    with pytest.raises(AttributeError):
        cprop.Adam().n_state = 0
    trainer = cprop.Trainer(net, loss="mse", optimizer=opt, batch_size=4)
    trainer.fit(X, y, epochs=1)
    opt.momentum = 0.9                       # now the step needs a parameter-sized state
    trainer.fit(X, y, epochs=1)
    assert opt.state[0].shape == net.params.shape
    opt.state = [np.zeros(3)]                # a wrong state is replaced, never passed on
    trainer.fit(X, y, epochs=1)
    assert opt.state[0].shape == net.params.shape
    state = opt.state[0]
    state.shape = (2, -1)                    # reshaped in place: replaced too
    trainer.fit(X, y, epochs=1)
    assert opt.state[0].ndim == 1
    for bad in (-1, "3", 1.5):
        opt.step_count = bad
        with pytest.raises((TypeError, ValueError), match="step_count"):
            trainer.fit(X, y, epochs=1)
        opt.step_count = 0
    assert np.isfinite(net.params).all()


@pytest.mark.parametrize("count", [2**63 - 1, 2**64])
def test_a_step_count_the_kernels_cannot_hold_or_advance_is_refused(rng, count, tmp_path):
    # Adam's step count is a C integer that each step advances: one at its largest would
    # overflow (every update then non-finite: a false divergence), one beyond it did not
    # convert (OverflowError, and under comm an MPI_Abort, as the ranks had agreed on it)
    net = small_net((4, 8, 2))
    X, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    trainer = cprop.Trainer(net, optimizer=cprop.Adam(), batch_size=4)
    trainer.fit(X, y, epochs=1)
    params = net.params.copy()
    trainer.optimizer.step_count = count
    with pytest.raises(ValueError, match="step_count"):
        trainer.fit(X, y, epochs=1)
    assert_array_equal(net.params, params)
    trainer.optimizer.step_count = 2**40     # a large count the kernels hold: trains on
    trainer.fit(X, y, epochs=1)
    assert trainer.optimizer.step_count == 2**40 + 5
    trainer.save(tmp_path / "t.npz")            # and saved with it, it loads
    assert cprop.Trainer.load(tmp_path / "t.npz").optimizer.step_count == 2**40 + 5


def test_reshaping_the_callers_X_mid_fit_does_not_reach_the_epoch(rng):
    net = small_net((8, 4, 2))
    X, y = rng.normal(size=(40, 8)), rng.normal(size=(40, 2))
    reference = small_net((8, 4, 2))
    cprop.Trainer(reference, loss="mse", batch_size=8, seed=0).fit(X.copy(), y, epochs=3)

    def reshape(trainer, epoch, logs):
        if epoch == 1:
            X.shape = (80, 4)                # the caller's object; fit holds its own view

    cprop.Trainer(net, loss="mse", batch_size=8, seed=0).fit(X, y, epochs=3, callbacks=[reshape])
    assert_array_equal(net.params, reference.params)


def test_trainer_swaps_in_a_subprocess_do_not_crash():
    # these two crashed: the empty labels array indexed, and a double free
    proc = run_python("""
        import numpy as np, cprop
        rng = np.random.default_rng(0)
        X, y = rng.normal(size=(64, 16)), rng.normal(size=(64, 2))
        for name, value in [("loss", "cross_entropy"),
                            ("net", cprop.Sequential([cprop.Dense(16, 1024), cprop.Dense(1024, 2)]))]:
            trainer = cprop.Trainer(cprop.Sequential([cprop.Dense(16, 2)], seed=0), loss="mse")
            try:
                trainer.fit(X, y, epochs=3, callbacks=[lambda t, e, logs: setattr(t, name, value)])
            except RuntimeError as exc:
                print("refused", name)
        print("survived")
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["refused", "loss", "refused", "net", "survived"]


# -- threads -------------------------------------------------------------------------------

def test_one_trainer_fitting_in_two_threads_raises(rng):
    net = small_net((4, 8, 2))
    trainer = cprop.Trainer(net, loss="mse", optimizer=cprop.Adam(), batch_size=4)
    X, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    inside, release = threading.Event(), threading.Event()

    def hold(trainer, epoch, logs):
        inside.set()
        release.wait(30)

    worker = threading.Thread(target=trainer.fit, args=(X, y), kwargs={"epochs": 1, "callbacks": [hold]})
    worker.start()
    try:
        assert inside.wait(30)
        with pytest.raises(RuntimeError, match="already running fit"):
            trainer.fit(X, y, epochs=1)
        other = cprop.Trainer(net, loss="mse")      # another trainer on the same network
        with pytest.raises(RuntimeError, match="another thread is training this network"):
            other.fit(X, y, epochs=1)
        out = net.forward(X)                          # inference and forward stay allowed
        with pytest.raises(RuntimeError, match="another thread is training"):
            net.backward(np.ones_like(out))
        with pytest.raises(RuntimeError, match="another thread is training"):
            cprop.SGD().step(net)
    finally:
        release.set()
        worker.join()
    assert trainer.optimizer.step_count == 5          # 20 samples / 4 per batch: nothing lost
    trainer.fit(X, y, epochs=1)
    assert trainer.optimizer.step_count == 10


def test_forward_backward_in_one_thread_while_another_runs_big_forwards(rng):
    # each thread's backward uses its own forward's activations (this crashed when
    # layers cached the last X and Y for everyone)
    net = small_net((32, 64, 4), dtype="float32")
    X_small = rng.normal(size=(5, 32)).astype(np.float32)
    X_big = rng.normal(size=(50_000, 32)).astype(np.float32)
    G = np.ones((5, 4), np.float32)
    net.forward(X_small)
    net.backward(G)
    expected = net.grads.copy()
    stop = threading.Event()
    errors = []

    def big_forwards():
        try:
            while not stop.is_set():
                assert net.forward(X_big).shape == (50_000, 4)
        except Exception as exc:       # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=big_forwards)
    worker.start()
    try:
        for _ in range(200):
            net.forward(X_small)
            net.backward(G)
            assert_array_equal(net.grads, expected)
    finally:
        stop.set()
        worker.join()
    assert not errors


# -- non-finite outputs ------------------------------------------------------------------------

def test_predictions_from_non_finite_outputs_warn(rng):
    net = small_net((4, 8, 3), dtype="float32")
    trainer = cprop.Trainer(net, loss="cross_entropy")
    net.params[...] = 1e10
    X = np.full((6, 4), 1e20)                     # overflows float32 inside the network ...
    X[:3] = rng.uniform(0, 1, size=(3, 4))        # ... these rows do not (3e21 at most)
    for call in (trainer.predict, trainer.predict_proba):
        with pytest.warns(RuntimeWarning, match="NaN or infinite for 3 of 6 rows"):
            call(X)
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        trainer.evaluate(X, np.zeros(6, int))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.predict(X[:3])                   # finite rows: no warning


def test_gradients_still_match_the_reference_through_views(rng):
    # the kernels read the flat arrays; the views users see are the same numbers
    net = small_net((5, 7, 3))
    X = rng.normal(size=(9, 5))
    out = net.forward(X)
    net.backward(np.ones_like(out))
    layers, acts = layers_of(net), activations_of(net)
    outputs = ref.forward(layers, acts, X)
    assert_allclose(out, outputs[-1], rtol=1e-12)
    assert_allclose(net.grads, flat(ref.backward(layers, acts, X, outputs, np.ones_like(out))), rtol=1e-10)


# -- the epoch's sample order -------------------------------------------------------------

def test_a_replaced_or_patched_generator_cannot_hand_the_epoch_bad_indices():
    # the compiled epoch indexes X with the order unchecked: a generator that returns
    # indices out of range, too few of them or floats once read outside X
    result = run_python("""
        import numpy as np, cprop
        X, y = np.random.rand(20, 4), np.random.rand(20, 2)
        bad = {"out of range": lambda n: np.arange(n) + 10**6, "short": lambda n: np.arange(n // 2),
               "long": lambda n: np.arange(10 * n), "floats": lambda n: np.arange(n) * 1.5,
               "negative": lambda n: -np.arange(1, n + 1)}
        for name, permutation in bad.items():
            class Patched(np.random.Generator):
                pass
            Patched.permutation = staticmethod(permutation)
            net = cprop.Sequential([cprop.Dense(4, 8, "relu"), cprop.Dense(8, 2)], dtype="float64", seed=0)
            tr = cprop.Trainer(net, batch_size=4, seed=0)
            tr.rng = Patched(np.random.PCG64(0))
            tr.fit(X, y, epochs=2)      # the order comes from numpy's own permutation
            assert tr.epochs_done == 2, name
        class NotAGenerator:
            def permutation(self, n):
                return np.arange(n) + 10**6
        tr.rng = NotAGenerator()
        try:
            tr.fit(X, y)
        except TypeError as exc:
            assert "numpy Generator" in str(exc), exc
        else:
            raise AssertionError("a non-Generator rng was accepted")
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_epoch_order_is_the_generators_permutation(rng):
    # drawing through numpy's own method changes nothing for an ordinary generator
    net = small_net()
    trainer = cprop.Trainer(net, seed=3)
    expected = np.random.default_rng(3).permutation(50)
    order = trainer._shuffled_order(50)
    assert order.dtype == np.intp and order.flags.c_contiguous
    assert_array_equal(order, expected)
    # drawn in place into the fit's reused buffer (as every epoch does): the same orders
    buffer, identity = np.full(50, -1, dtype=np.intp), np.arange(50, dtype=np.intp)
    ours, numpys = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(3):      # epoch after epoch, the sequence of orders permutation gives
        assert trainer._shuffled_order(50, rng=ours, out=buffer, identity=identity) is buffer
        assert_array_equal(buffer, numpys.permutation(50))
    assert_array_equal(identity, np.arange(50))


# -- a subclass's structural attributes cannot misstate the plan ---------------------------

def test_a_sequential_subclass_lying_about_its_widths_gets_checked_against_the_plan():
    result = run_python("""
        import numpy as np, cprop
        for n_in, n_out in ((1, 1), (100, 50)):
            class Liar(cprop.Sequential):
                n_inputs = property(lambda self: n_in)
                n_outputs = property(lambda self: n_out)
                dtype = property(lambda self: np.float32)
            net = Liar([cprop.Dense(4, 8, "relu"), cprop.Dense(8, 2)], dtype="float64", seed=0)
            X_lie, y_lie = np.random.rand(20, n_in), np.random.rand(20, n_out)
            calls = {"fit": lambda: cprop.Trainer(net, batch_size=4).fit(X_lie, y_lie),
                     "evaluate": lambda: cprop.Trainer(net).evaluate(X_lie, y_lie),
                     "forward": lambda: net.forward(X_lie), "predict_raw": lambda: net.predict_raw(X_lie),
                     "backward": lambda: (net.forward(np.ones((20, 4))), net.backward(np.ones((20, n_out))))}
            for name, call in calls.items():
                try:
                    call()
                except ValueError as exc:
                    assert "expects 4" in str(exc) or "(20, 2)" in str(exc), (name, exc)
                else:
                    raise AssertionError(f"{name} accepted widths {n_in}, {n_out}")
            # the true widths work, in the true dtype
            X, y = np.random.rand(20, 4), np.random.rand(20, 2)
            tr = cprop.Trainer(net, batch_size=4)
            tr.fit(X, y)
            assert net.predict_raw(X).shape == (20, 2) and net.predict_raw(X).dtype == np.float64
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- layer subclasses whose declarations disagree ------------------------------------------

def test_layer_subclasses_with_inconsistent_declarations_are_refused_when_the_plan_is_built():
    result = run_python("""
        import numpy as np, cprop
        from cprop.layers import Dense, BatchNorm, LayerNorm, Dropout
        class NoBuffers(BatchNorm):
            n_buffers = property(lambda self: 0)
        class DenseCallingItselfBatchNorm(Dense):
            kind = "batchnorm"
        class FewerParams(Dense):
            n_params = property(lambda self: 3)
        class LayerNormCallingItselfDense(LayerNorm):
            kind = "dense"
        class DropoutWithParams(Dropout):
            n_params = property(lambda self: 5)
        class NoPreActivation(Dense):
            def plan(self, row, hyper, columns, bstats, codes):
                super().plan(row, hyper, columns, bstats, codes)
                row[codes["z"]] = -1
        class ColumnOutside(Dense):
            def plan(self, row, hyper, columns, bstats, codes):
                super().plan(row, hyper, columns, bstats, codes)
                row[codes["g"]] = 10**6
        class ColumnShared(LayerNorm):
            def plan(self, row, hyper, columns, bstats, codes):
                super().plan(row, hyper, columns, bstats, codes)
                row[codes["xhat"]] = row[codes["y"]] + 1
        class BufferFarAway(BatchNorm):
            def plan(self, row, hyper, columns, bstats, codes):
                super().plan(row, hyper, columns, bstats, codes)
                row[codes["buffer"]] = 10**6
        class NoOutputColumn(Dense):
            def plan(self, row, hyper, columns, bstats, codes):
                super().plan(row, hyper, columns, bstats, codes)
                row[codes["y"]] = -1
        class Convolution(Dense):
            kind = "conv"
        cases = [[Dense(4, 8), NoBuffers(8), Dense(8, 2)], [DenseCallingItselfBatchNorm(4, 8), Dense(8, 2)],
                 [FewerParams(4, 8), Dense(8, 2)], [Dense(4, 8), LayerNormCallingItselfDense(8), Dense(8, 2)],
                 [Dense(4, 8), DropoutWithParams(0.5), Dense(8, 2)], [NoPreActivation(4, 8, "gelu"), Dense(8, 2)],
                 [ColumnOutside(4, 8), Dense(8, 2)], [Dense(4, 8), ColumnShared(8), Dense(8, 2)],
                 [Dense(4, 8), BufferFarAway(8), Dense(8, 2)], [NoOutputColumn(4, 8), Dense(8, 2)],
                 [Convolution(4, 8), Dense(8, 2)]]
        X, y = np.random.rand(16, 4), np.random.rand(16, 2)
        for layers in cases:
            name = type(next(l for l in layers if type(l).__module__ == "__main__")).__name__
            try:
                net = cprop.Sequential(layers, dtype="float64", seed=0)
                cprop.Trainer(net, batch_size=4).fit(X, y)
            except ValueError as exc:
                assert "plan" in str(exc) or "kind" in str(exc), (name, exc)
            else:
                raise AssertionError(f"{name} was accepted")
            # the refused layers are free to join another network
            assert all(layer._params is None for layer in layers), name
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_structure_users_read_comes_from_the_checked_plan():
    net = cprop.Sequential([cprop.Dense(4, 8, "gelu"), cprop.LayerNorm(8), cprop.Dense(8, 3)], seed=0)
    assert_array_equal(net.sizes, [4, 8, 8, 3])
    assert_array_equal(net.activations, [cprop.activations.activation_code(a)
                                         for a in ("gelu", "identity", "identity")])


# -- the caller's arrays cannot be reallocated under a kernel -------------------------------

def test_resizing_the_callers_X_between_forward_and_backward_does_not_reach_the_tape():
    result = run_python("""
        import numpy as np, cprop
        net = cprop.Sequential([cprop.Dense(64, 64, "relu"), cprop.Dense(64, 2)], dtype="float64", seed=0)
        X = np.random.default_rng(0).random((2000, 64))
        reference = net.copy()
        reference.forward(X.copy(), training=True)
        reference.backward(np.ones((2000, 2)))
        out = net.forward(X, training=True)
        X.resize((1, 64), refcheck=False)          # frees the memory X's views pointed at
        junk = [np.full((2000, 64), np.nan) for _ in range(20)]
        net.backward(np.ones_like(out))
        assert np.array_equal(net.grads, reference.grads)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_resizing_the_callers_arrays_mid_fit_is_refused():
    result = run_python("""
        import numpy as np, cprop
        rng = np.random.default_rng(0)
        X, y, w = rng.random((2000, 64)), rng.random((2000, 2)), rng.random(2000) + 0.5
        for name, arr, shape in (("X", X, (1, 64)), ("y", y, (1, 2))):
            net = cprop.Sequential([cprop.Dense(64, 8, "relu"), cprop.Dense(8, 2)], dtype="float64", seed=0)
            def resize(trainer, epoch, logs):
                arr.resize(shape, refcheck=False)
            try:
                cprop.Trainer(net, batch_size=16).fit(X[:, :], y, epochs=3, callbacks=[resize],
                                                      sample_weight=w, validation_data=(X, y))
            except ValueError as exc:
                assert "cannot resize" in str(exc), exc
            else:
                raise AssertionError(f"{name} was resized mid-fit")
        # the weights are normalised into an array of fit's own: the caller's may change
        net = cprop.Sequential([cprop.Dense(64, 8, "relu"), cprop.Dense(8, 2)], dtype="float64", seed=0)
        cprop.Trainer(net, batch_size=16).fit(X, y, epochs=2, sample_weight=w, callbacks=[
            lambda trainer, epoch, logs: w.resize((1,), refcheck=False)])
        assert np.isfinite(net.params).all()
        X.resize((10, 64), refcheck=False)     # after fit, the caller's arrays are theirs again
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_changing_the_callers_labels_mid_fit_does_not_reach_the_kernels():
    # the labels index the output's columns: they are validated into an array of fit's own,
    # so labels the caller sets out of range afterwards (here from a callback) are not read
    result = run_python("""
        import numpy as np, cprop
        rng = np.random.default_rng(0)
        X, y = rng.random((2000, 8)), rng.integers(0, 3, 2000).astype(np.intp)
        net = cprop.Sequential([cprop.Dense(8, 16, "relu"), cprop.Dense(16, 3)], dtype="float64", seed=0)
        reference = net.copy()
        cprop.Trainer(reference, loss="cross_entropy", batch_size=16, seed=0).fit(X, y.copy(), epochs=3)
        def corrupt(trainer, epoch, logs):
            y[:] = 10**12
        cprop.Trainer(net, loss="cross_entropy", batch_size=16, seed=0).fit(X, y, epochs=3, callbacks=[corrupt])
        assert np.array_equal(net.params, reference.params)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr)


# -- cprop called from a signal handler inside a running epoch ------------------------------

def signal_handler_calling(call):
    """Source of a script's first lines: networks `net` (the one to train) and `other`, data
    X, y, and a SIGALRM handler that, when it runs inside net's compiled epoch, makes `call`
    there, counting in `seen` the calls made and those refused; the timer started."""
    return textwrap.dedent(f"""
        import os, signal, tempfile, numpy as np, cprop
        from cprop._threads import epoch_network
        rng = np.random.default_rng(0)
        net = cprop.Sequential([cprop.Dense(64, 256, "relu"), cprop.Dense(256, 2)], dtype="float64", seed=0)
        other = cprop.Sequential([cprop.Dense(64, 128, "relu"), cprop.Dense(128, 2)], dtype="float64", seed=1)
        X, y = rng.random((20000, 64)), rng.random((20000, 2))
        expected = other.predict_raw(X[:3000], n_threads=1)
        seen = {{"in_epoch": 0, "refused": 0}}

        def handler(signum, frame):
            if epoch_network() is not net or seen.get("busy"):   # not nested in itself
                return
            seen["in_epoch"] += 1
            seen["busy"] = True
            try:
                if "{call}" == "predict_raw":
                    assert np.allclose(other.predict_raw(X[:3000], n_threads=2), expected)
                elif "{call}" == "forward":
                    assert np.allclose(other.forward(X[:3000], n_threads=2), expected)
                elif "{call}" == "fit_other":
                    cprop.Trainer(other, batch_size=256, n_threads=2).fit(X[:2000], y[:2000])
                elif "{call}" == "backward_same":
                    net.backward(np.ones((64, 2)), n_threads=2)
                elif "{call}" == "save_same":
                    net.save(os.path.join(tempfile.mkdtemp(), "mid_epoch.npz"))
                else:
                    net._has_grads = True
                    cprop.SGD(lr=0.1).step(net, n_threads=2)
            except RuntimeError as exc:
                assert "signal handler" in str(exc), exc
                seen["refused"] += 1
            finally:
                seen["busy"] = False

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
        net.forward(X[:64])
    """)


@pytest.mark.parametrize("call", ["predict_raw", "forward", "fit_other", "backward_same", "step_same",
                                  "save_same"])
def test_cprop_from_a_signal_handler_inside_a_multithreaded_epoch_does_not_hang(call):
    # the epoch takes the GIL every 50 ms to run signal handlers, inside its parallel
    # region: a nested parallel region there once reset the thread's team barrier (hang)
    result = run_python(signal_handler_calling(call) + textwrap.dedent(f"""
        try:
            cprop.Trainer(net, batch_size=512, n_threads=2).fit(
                X, y, epochs=500, callbacks=[lambda tr, epoch, logs: seen["in_epoch"] >= 3])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
        assert seen["in_epoch"] >= 3 and np.isfinite(net.params).all(), seen
        assert (seen["refused"] == seen["in_epoch"]) == ("{call}".endswith("same")), seen
        print("ok")
    """), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_forked_child_runs_cprop_on_one_thread_instead_of_hanging():
    # libgomp's pool does not survive fork(): a parallel region in the child waited for good
    result = run_python("""
        import os, time, signal, numpy as np, cprop
        net = cprop.Sequential([cprop.Dense(64, 256, "relu"), cprop.Dense(256, 2)], dtype="float64", seed=0)
        X, y = np.random.default_rng(0).random((20000, 64)), np.random.default_rng(1).random((20000, 2))
        cprop.Trainer(net, batch_size=512, n_threads=2).fit(X, y)      # the parent's pool is up
        expected = net.predict_raw(X, n_threads=1)
        pid = os.fork()
        if pid == 0:
            ok = cprop.get_num_threads() == 1 and np.allclose(net.predict_raw(X, n_threads=2), expected)
            cprop.Trainer(net, batch_size=512, n_threads=2).fit(X, y)
            os._exit(0 if ok else 3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise SystemExit("the forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert not cprop._threads._forked          # the parent keeps its threads
        print("ok")
    """, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr + result.stdout


# -- optimizer state arrays cannot alias each other or the parameters ----------------------

def test_aliased_optimizer_state_is_copied_in_and_steps_as_separate_state(rng):
    X, y = rng.normal(size=(64, 16)), rng.normal(size=(64, 2))
    reference_net, net = small_net(), small_net()
    reference = cprop.Trainer(reference_net, optimizer=cprop.Adam(lr=1e-2), batch_size=16, seed=0)
    reference.fit(X, y)
    opt = cprop.Adam(lr=1e-2)
    trainer = cprop.Trainer(net, optimizer=opt, batch_size=16, seed=0)
    trainer.fit(X[:16], y[:16], epochs=0)
    shared = np.zeros(net.n_params)
    opt.state = [shared, shared]                 # one array for both moments
    trainer.fit(X, y)
    assert_allclose(net.params, reference_net.params, rtol=1e-12, atol=1e-12)
    assert not np.shares_memory(opt.state[0], opt.state[1])
    assert not shared.any()                      # the caller's array is not the state

    momentum_net = small_net()
    sgd = cprop.SGD(lr=1e-2, momentum=0.9)
    sgd.state = [momentum_net.params]            # a view of the parameters themselves
    before = momentum_net.params.copy()
    cprop.Trainer(momentum_net, optimizer=sgd, batch_size=16, seed=0).fit(X, y)
    assert not np.shares_memory(sgd.state[0], momentum_net.params)
    assert np.isfinite(momentum_net.params).all() and not np.array_equal(momentum_net.params, before)


def test_optimizer_state_reads_are_views_that_cannot_be_resized():
    net = small_net()
    opt = cprop.SGD(lr=0.1, momentum=0.9)
    net.forward(np.ones((4, 16)))
    net.backward(np.ones((4, 2)))
    opt.step(net)
    view = opt.state[0]
    view[...] = 1.0                              # in-place writes reach the state
    assert (opt.state[0] == 1).all()
    with pytest.raises(ValueError):
        view.resize((1,), refcheck=False)        # a view does not own its memory


def test_an_array_handed_over_by_array_protocol_is_pinned_while_the_tape_keeps_it():
    result = run_python("""
        import numpy as np, cprop
        class Holder:                   # np.asarray(holder) is holder.data itself, no view
            def __init__(self):
                self.data = np.random.default_rng(0).random((2000, 64))
            def __array__(self, dtype=None, copy=None):
                return self.data
        net = cprop.Sequential([cprop.Dense(64, 8), cprop.Dense(8, 2)], dtype="float64", seed=0)
        holder = Holder()
        out = net.forward(holder, training=True)
        try:
            holder.data.resize((1,), refcheck=False)
        except ValueError:
            pass
        else:
            raise AssertionError("the tape's X was resized")
        net.backward(np.ones_like(out))
        net.forward(np.ones((3, 64)))              # a new tape lets it go
        holder.data.resize((1,), refcheck=False)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- a network rebuilt or its arrays replaced while a fit holds them ----------------------------

def test_a_built_network_cannot_be_built_again():
    net = small_net()
    with pytest.raises(RuntimeError, match="already built"):
        net.__init__([cprop.Dense(16, 4096), cprop.Dense(4096, 2)])
    with pytest.raises(RuntimeError, match="already built"):
        net.__setstate__(small_net((16, 4096, 2)).__getstate__())
    assert net.n_params == 16 * 32 + 32 + 32 * 2 + 2
    # pickling still builds fresh networks
    import pickle
    assert_array_equal(pickle.loads(pickle.dumps(net)).params, net.params)


def test_the_networks_and_optimizers_arrays_cannot_be_resized_even_without_refcheck():
    net = small_net()
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.Adam(), seed=0)
    X, y = np.random.default_rng(0).normal(size=(64, 16)), np.arange(64) % 2
    trainer.fit(X, y)
    for arr in (net.params, net.grads, trainer.optimizer.state[0], trainer.optimizer.state[1]):
        owner = arr.base if arr.base is not None else arr
        with pytest.raises(ValueError):
            owner.resize(3, refcheck=False)
    trainer.fit(X, y)      # still trains
    import pickle
    copied = pickle.loads(pickle.dumps(trainer.optimizer))     # the pin is not pickled
    assert_array_equal(copied.state[1], trainer.optimizer.state[1])


@pytest.mark.parametrize("attribute", ["_plan", "_params", "_grads", "_buffers"])
def test_arrays_replaced_from_a_callback_stop_the_fit_and_reach_no_kernel(attribute):
    X, y = np.random.default_rng(0).normal(size=(200, 16)), np.arange(200) % 2
    other = small_net((16, 4096, 2))
    net = small_net()
    replacement = {"_plan": other._plan, "_params": np.zeros(3), "_grads": np.zeros(3),
                   "_buffers": np.zeros(0)}[attribute]

    def swap(trainer, epoch, logs):
        setattr(trainer.net, attribute, replacement)
    trainer = cprop.Trainer(net, loss="cross_entropy", batch_size=32, seed=0)
    with pytest.raises(RuntimeError, match="replaced during fit"):
        trainer.fit(X, y, epochs=3, callbacks=[swap])
    # the core refuses arrays that do not fit the plan, whichever Python path calls it
    if attribute in ("_plan", "_params"):
        for call in (lambda: net.forward(X), lambda: net.predict_raw(X)):
            with pytest.raises(ValueError, match="rebuilt"):
                call()
    if attribute != "_buffers":
        net._has_grads = True
        with pytest.raises(ValueError, match="rebuilt"):
            cprop.SGD(momentum=0.9).step(net)


@pytest.mark.parametrize("call", ["Trainer.save", "Sequential.save", "set_params", "init_params",
                                  "forward_training"])
def test_another_thread_cannot_save_or_change_a_network_mid_fit(call, tmp_path):
    # from the fitting thread's callback, another thread tries while the fit holds the network
    X, y = np.random.default_rng(0).normal(size=(100, 16)), np.arange(100) % 2
    net = cprop.Sequential([cprop.Dense(16, 8, "relu"), cprop.BatchNorm(8), cprop.Dense(8, 2)], seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", seed=0)
    calls = {"Trainer.save": lambda: trainer.save(tmp_path / "t.npz"),
             "Sequential.save": lambda: net.save(tmp_path / "n.npz"),
             "set_params": lambda: net.set_params(net.params),
             "init_params": lambda: net.init_params(1),
             "forward_training": lambda: net.forward(X, training=True)}
    errors = []

    def elsewhere(trainer, epoch, logs):
        def attempt():
            try:
                calls[call]()
            except RuntimeError as exc:
                errors.append(str(exc))
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()
        trainer.save(tmp_path / "from_callback.npz")       # the fitting thread itself may
    trainer.fit(X, y, epochs=2, callbacks=[elsewhere])
    assert len(errors) == 2 and all("another thread is training this network" in e for e in errors)
    assert not (tmp_path / "t.npz").exists() and not (tmp_path / "n.npz").exists()
    assert cprop.Trainer.load(tmp_path / "from_callback.npz").epochs_done == 2


def test_an_adam_eps_set_below_the_normal_range_mid_fit_is_named():
    X, y = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32), np.arange(64) % 2
    trainer = cprop.Trainer(small_net(dtype="float32"), loss="cross_entropy", optimizer=cprop.Adam(),
                            seed=0)

    def shrink(trainer, epoch, logs):
        trainer.optimizer.eps = 1e-40
    with pytest.raises(ValueError, match="eps=1e-40 is below the smallest normal"):
        trainer.fit(X, y, epochs=3, callbacks=[shrink])
    assert trainer.epochs_done == 1 and np.isfinite(trainer.net.params).all()


def test_a_negative_adam_second_moment_in_a_file_is_refused(tmp_path):
    import zipfile
    X, y = np.random.default_rng(0).normal(size=(64, 16)), np.arange(64) % 2
    trainer = cprop.Trainer(small_net(), loss="cross_entropy", optimizer=cprop.Adam(), seed=0)
    trainer.fit(X, y)
    trainer.save(tmp_path / "ok.npz")
    import io
    member = io.BytesIO()
    np.save(member, -np.ones(trainer.net.n_params))
    with zipfile.ZipFile(tmp_path / "ok.npz") as src, zipfile.ZipFile(tmp_path / "bad.npz", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, member.getvalue() if name == "state_1.npy" else src.read(name))
    with pytest.raises(cprop.CpropFileError, match="second moment"):
        cprop.Trainer.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("attribute, value, error", [("epochs_done", -5, ValueError),
                                                     ("epochs_done", 1.5, TypeError),
                                                     ("history", None, TypeError)])
def test_the_trainers_counters_are_checked_at_fit(attribute, value, error):
    trainer = cprop.Trainer(small_net(), loss="cross_entropy", seed=0)
    setattr(trainer, attribute, value)
    with pytest.raises(error, match=attribute):
        trainer.fit(np.ones((4, 16)), np.arange(4) % 2)


@pytest.mark.parametrize("attribute, value, error", [("epochs_done", "x", TypeError),
                                                     ("epochs_done", 1.5, TypeError),
                                                     ("history", None, TypeError)])
def test_the_trainers_counters_set_by_a_callback_are_named_before_the_next_one_reads_them(
        attribute, value, error, tmp_path):
    trainer = cprop.Trainer(small_net(), loss="cross_entropy", seed=0)

    def meddle(trainer, epoch, logs):
        setattr(trainer, attribute, value)
    with pytest.raises(error, match=attribute):     # not the Checkpoint's own failure
        trainer.fit(np.ones((4, 16)), np.arange(4) % 2, epochs=3, callbacks=[meddle],
                    checkpoint=tmp_path / "run.npz")


def test_a_trainer_copies_and_pickles_between_fits_and_resumes_alike():
    import copy
    import pickle
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(100, 16)), rng.integers(0, 2, 100)
    trainer = cprop.Trainer(small_net(), loss="cross_entropy", optimizer=cprop.Adam(), seed=0)
    trainer.fit(X, y, epochs=2)
    copies = [copy.deepcopy(trainer), pickle.loads(pickle.dumps(trainer))]
    for t in [trainer, *copies]:
        t.fit(X, y, epochs=2)
    for t in copies:
        assert t.net is not trainer.net and t.epochs_done == 4
        assert_array_equal(t.net.params, trainer.net.params)


def test_a_network_too_large_to_allocate_is_named():
    with pytest.raises(MemoryError, match="cannot allocate 4,611,686,016,279,904,256 float32 values"):
        cprop.Sequential([cprop.Dense(2**31 - 1, 2**31 - 1)])


def test_an_edited_or_replaced_plan_is_refused_before_any_kernel_reads_it():
    from cprop._lazy import core
    PLAN_INT = core.PLAN_INT
    X = np.ones((64, 4), np.float32)
    net = cprop.Sequential([cprop.Dense(4, 8, "relu"), cprop.Dense(8, 3)], seed=0)
    table = net._plan[0]
    table.flags.writeable = True        # numpy allows it: the table owns its memory
    table[1, PLAN_INT["y"]] = 10**9
    for call in (lambda: net.forward(X), lambda: net.predict_raw(X)):
        with pytest.raises(ValueError, match="plan, row 1"):
            call()
    # a plan of the same parameter count with other widths
    net = cprop.Sequential([cprop.Dense(4, 8, "relu"), cprop.Dense(8, 3)], seed=0)
    bad = net._plan[0].copy()
    bad[0, PLAN_INT["n_out"]] = 1000
    bad[1, PLAN_INT["n_in"]] = 1000
    net._plan = (bad, *net._plan[1:])
    trainer = cprop.Trainer(net, "mse", cprop.SGD(lr=0.01, clip_norm=1.0), n_threads=1)
    with pytest.raises(ValueError, match="plan, row 0"):
        trainer.fit(X, np.ones((64, 3), np.float32))


def test_a_sparse_input_follows_the_plans_first_layer_not_the_layer_list():
    sparse = pytest.importorskip("scipy.sparse")
    net = cprop.Sequential([cprop.BatchNorm(5), cprop.Dense(5, 3)], seed=0)
    X = sparse.random(100, 5, density=0.5, format="csr", random_state=0)
    expected = net.predict_raw(X.toarray())
    net._layers = (cprop.Dense(5, 5),) + net._layers[1:]       # the list lies about the first layer
    assert_allclose(net.predict_raw(X), expected, rtol=1e-6)


def test_memory_swapped_by_ndarray_setstate_is_never_freed_under_a_fit():
    # numpy's __setstate__ frees an owning array's memory whatever refers to it: the network's
    # and optimizer's memory is owned by no ndarray, and the caller's X is checked each epoch
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(4000, 50)), rng.normal(size=(4000, 1))
    net = cprop.Sequential([cprop.Dense(50, 8, "relu"), cprop.Dense(8, 1)], dtype="float64", seed=0)
    trainer = cprop.Trainer(net, "mse", cprop.Adam(), batch_size=256, n_threads=1)
    trainer.fit(X, y)
    for arr in (net._params, net._grads, trainer.optimizer._state[1]):
        assert not arr.flags.owndata
        with pytest.raises(BufferError):
            arr.base.obj.extend(b"0")       # the bytearray under it cannot move either

    def swap(trainer, epoch, logs):
        X.__setstate__((1, (1, 50), np.dtype(np.float64), False, bytes(400)))
    with pytest.raises(RuntimeError, match="training or validation data's memory was replaced"):
        trainer.fit(X, y, epochs=3, callbacks=[swap])


def test_validation_data_swapped_from_a_callback_stops_the_fit():
    proc = run_python("""
        import numpy as np, cprop
        X, y = np.ones((64, 4), np.float32), np.ones((64, 1), np.float32)
        Xv, yv = np.ones((200_000, 4), np.float32), np.ones((200_000, 1), np.float32)
        trainer = cprop.Trainer(cprop.Sequential([cprop.Dense(4, 1)], seed=0), loss="mse")
        def swap(trainer, epoch, logs):
            Xv.__setstate__((1, (1, 4), np.dtype(np.float32), False, b"\\0" * 16))
        try:
            trainer.fit(X, y, epochs=2, validation_data=(Xv, yv), callbacks=[swap])
        except RuntimeError as exc:
            print("refused:", exc)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "refused: the training or validation data's memory was replaced" in proc.stdout


@pytest.mark.parametrize("shuffle", [True, False])
def test_data_freed_by_a_signal_handler_inside_an_epoch_stops_it_before_it_is_read(shuffle):
    """Python's signal handlers run between an epoch's batches; one that frees the memory
    under the caller's X (a view of an array it swaps with __setstate__) is caught by the
    check that runs after them, while no thread reads X."""
    proc = run_python(f"""
        import signal, numpy as np, cprop
        rng = np.random.default_rng(0)
        owner = rng.standard_normal(200_000 * 32).astype(np.float32)
        X = owner.reshape(200_000, 32)                  # a view: its address outlives the swap
        y = rng.integers(0, 3, 200_000)
        net = cprop.Sequential([cprop.Dense(32, 1024, "relu"), cprop.Dense(1024, 3)], seed=0)
        trainer = cprop.Trainer(net, "cross_entropy", shuffle={shuffle}, n_threads=2)
        def free_X(*args):
            owner.__setstate__((1, (1,), np.dtype(np.float32), False, b"\\0" * 4))
        signal.signal(signal.SIGALRM, free_X)
        class Arm(cprop.Callback):       # the alarm goes off 50 ms into the first epoch
            def on_train_begin(self, trainer):
                signal.setitimer(signal.ITIMER_REAL, 0.05)
        arm = Arm()
        try:
            trainer.fit(X, y, epochs=3, callbacks=[arm])
        except RuntimeError as exc:
            print("refused:", exc)
        print("finite:", bool(np.isfinite(net.params).all()))
    """)
    assert proc.returncode == 0, proc.stderr
    assert "refused: the training or validation data's memory was replaced" in proc.stdout
    assert "finite: True" in proc.stdout


def test_a_handmade_csr_input_is_checked_like_any_sparse_matrix():
    from cprop._validation import CSRInput
    net = small_net((3, 2))
    bad = CSRInput(np.ones(1), np.array([10**9], np.intp), np.array([0, 1], np.intp), (1, 3))
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 3\)"):
        net.predict_raw(bad)
    trainer = cprop.Trainer(net, "mse")
    with pytest.raises(ValueError, match=r"column indices must lie in \[0, 3\)"):
        trainer.fit(bad, np.ones((1, 2)))


def test_snapshots_of_a_network_wait_for_no_fit_in_another_thread(tmp_path):
    import pickle
    X, y = np.random.default_rng(0).normal(size=(100, 16)), np.arange(100) % 2
    net = small_net()
    errors = []

    def elsewhere(trainer, epoch, logs):
        def attempt():
            for call in (lambda: pickle.dumps(net), net.copy, lambda: net.astype("float32")):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(str(exc))
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()
        pickle.dumps(net)           # the fitting thread itself may
    cprop.Trainer(net, loss="cross_entropy", seed=0).fit(X, y, epochs=1, callbacks=[elsewhere])
    assert len(errors) == 3 and all("another thread is training this network" in e for e in errors)


@pytest.mark.parametrize("value", [False, "", [], {}, "0.5", -1.0])
def test_a_saved_clip_norm_must_be_a_number(value):
    cfg = cprop.SGD(lr=0.1).config()
    cfg["clip_norm"] = value
    with pytest.raises((TypeError, ValueError), match="clip_norm"):
        cprop.SGD.from_config(cfg)
