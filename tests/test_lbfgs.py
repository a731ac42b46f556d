"""cprop.LBFGS: full-batch L-BFGS (scipy's L-BFGS-B) driven through Trainer.

Oracles: least squares and ridge regression in closed form (a linear network is a
convex problem with one minimum), scipy's L-BFGS-B run on a NumPy objective, and runs
of the same L-BFGS stopped at a given iteration."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import cprop

from conftest import make_net


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = cprop._threads._num_threads
    cprop.set_num_threads(1)
    yield
    cprop.set_num_threads(before)


def linear_problem(n=200, d=5, m=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    Y = X @ rng.normal(size=(d, m)) + 0.5 + 0.1 * rng.normal(size=(n, m))
    return X, Y


def ridge(X, Y, penalty):
    """argmin ‖XW + b - Y‖²/(n·m) + penalty/2·‖W‖² (bias not penalised), in closed form."""
    n, m = Y.shape
    Xc, Yc = X - X.mean(axis=0), Y - Y.mean(axis=0)
    # gradient 2Xcᵀ(XcW - Yc)/(n·m) + penalty·W = 0
    W = np.linalg.solve(2 * Xc.T @ Xc / (n * m) + penalty * np.eye(X.shape[1]), 2 * Xc.T @ Yc / (n * m))
    return W, Y.mean(axis=0) - X.mean(axis=0) @ W


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_a_linear_network_reaches_the_least_squares_solution(weight_decay):
    X, Y = linear_problem()
    net = cprop.Sequential([cprop.Dense(5, 2)], dtype=np.float64, seed=0)
    opt = cprop.LBFGS(tol=1e-10, weight_decay=weight_decay)
    opt.decay_bias = False
    trainer = cprop.Trainer(net, "mse", optimizer=opt)

    history = trainer.fit(X, Y, epochs=1)

    # converged (scipy's relative reduction of f below 2.2e-9, or tol): the optimum's
    # value to that, the optimum itself to about its square root
    W, b = ridge(X, Y, weight_decay)
    assert opt.result.status == 0 and opt.result.success
    optimum = np.mean((X @ W + b - Y) ** 2) + weight_decay / 2 * np.sum(W * W)
    assert opt.result.fun == pytest.approx(optimum, rel=1e-8)
    assert_allclose(net.layers[0].W, W, rtol=0, atol=1e-5)
    assert_allclose(net.layers[0].b, b, rtol=0, atol=1e-5)
    # the history logs the data loss, the result holds the objective (decay term included)
    W_fit, b_fit = net.layers[0].W, net.layers[0].b
    assert trainer.epochs_done == 1 and len(history.loss) == 1
    assert history.loss[0] == pytest.approx(np.mean((X @ W_fit + b_fit - Y) ** 2), rel=1e-12)
    assert opt.result.fun - history.loss[0] == pytest.approx(weight_decay / 2 * np.sum(W_fit ** 2),
                                                             rel=1e-6, abs=1e-15)
    assert opt.step_count == opt.result.nit


def test_decay_per_sample_and_on_biases():
    X, Y = linear_problem(n=50)
    net = cprop.Sequential([cprop.Dense(5, 2)], dtype=np.float64, seed=0)
    opt = cprop.LBFGS(tol=1e-10, weight_decay=5.0)    # decays b too, by 5/50 per sample
    opt.decay_per_sample = True

    cprop.Trainer(net, "mse", optimizer=opt).fit(X, Y)

    # with the bias decayed: append a column of ones to X and penalise everything
    X1 = np.c_[X, np.ones(len(X))]
    Wb = np.linalg.solve(2 * X1.T @ X1 / Y.size + 0.1 * np.eye(6), 2 * X1.T @ Y / Y.size)
    assert_allclose(net.params, np.r_[Wb[:5].ravel(), Wb[5]], rtol=0, atol=1e-5)


def numpy_objective(net, X, labels, n_classes):
    """cross_entropy of a tanh-softmax network over flat parameters (cprop's layout), in NumPy."""
    (W0, b0), (W1, b1) = [(layer.W.shape, layer.b.shape) for layer in net.layers]
    sizes = [np.prod(W0), W0[1], np.prod(W1), W1[1]]
    onehot = np.eye(n_classes)[labels]

    def f(x):
        parts = np.split(x, np.cumsum(sizes)[:-1])
        A, c, B, d = parts[0].reshape(W0), parts[1], parts[2].reshape(W1), parts[3]
        H = np.tanh(X @ A + c)
        Z = H @ B + d
        Z = Z - Z.max(axis=1, keepdims=True)
        P = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(P[np.arange(len(X)), labels]))
        dZ = (P - onehot) / len(X)
        dH = dZ @ B.T * (1 - H ** 2)
        return loss, np.concatenate([(X.T @ dH).ravel(), dH.sum(0), (H.T @ dZ).ravel(), dZ.sum(0)])
    return f


def test_the_same_iterates_as_scipy_on_a_numpy_objective():
    from scipy.optimize import minimize
    rng = np.random.default_rng(1)
    X, labels = rng.normal(size=(120, 4)), rng.integers(0, 3, 120)
    net = make_net([4, 6, 3])
    x0 = net.params.copy()
    opt = cprop.LBFGS(max_iter=15, history=5)

    cprop.Trainer(net, "cross_entropy", optimizer=opt).fit(X, labels)

    theirs = minimize(numpy_objective(net, X, labels, 3), x0, jac=True, method="L-BFGS-B",
                      options={"maxiter": 15, "gtol": 1e-4, "maxcor": 5})
    assert opt.result.nit == theirs.nit == 15
    assert opt.result.nfev == theirs.nfev
    assert_allclose(net.params, theirs.x, rtol=1e-8, atol=1e-10)
    assert opt.result.fun == pytest.approx(theirs.fun, rel=1e-10)


def test_limits_end_the_run_and_say_so():
    rng = np.random.default_rng(2)
    X, labels = rng.normal(size=(100, 4)), rng.integers(0, 3, 100)
    by_iterations = cprop.LBFGS(max_iter=3)
    by_evaluations = cprop.LBFGS(max_fun=4)

    cprop.Trainer(make_net([4, 8, 3]), "cross_entropy", optimizer=by_iterations).fit(X, labels)
    cprop.Trainer(make_net([4, 8, 3]), "cross_entropy", optimizer=by_evaluations).fit(X, labels)

    assert by_iterations.result.nit == 3 and by_iterations.result.status == 1
    assert "ITERATIONS REACHED LIMIT" in by_iterations.result.message
    # evaluations are counted at the end of an iteration: the run stops at the first past 4
    assert by_evaluations.result.status == 1 and by_evaluations.result.nfev > 4
    assert "EVALUATIONS EXCEEDS LIMIT" in by_evaluations.result.message


def test_every_epoch_is_a_new_run_from_the_current_weights_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(3)
    X, labels = rng.normal(size=(80, 4)), rng.integers(0, 3, 80)
    straight = cprop.Trainer(make_net([4, 8, 3]), "cross_entropy", optimizer=cprop.LBFGS(max_iter=5))
    straight.fit(X, labels, epochs=3)
    halves = cprop.Trainer(make_net([4, 8, 3]), "cross_entropy", optimizer=cprop.LBFGS(max_iter=5))
    halves.fit(X, labels, epochs=1)
    halves.save(tmp_path / "t.npz")
    resumed = cprop.Trainer.load(tmp_path / "t.npz")
    resumed.fit(X, labels, epochs=2)

    assert straight.epochs_done == resumed.epochs_done == 3
    assert np.all(np.diff(straight.history.loss) < 0)
    assert straight.optimizer.step_count == 15
    assert repr(resumed.optimizer) == repr(straight.optimizer)
    assert_array_equal(resumed.net.params, straight.net.params)
    assert resumed.history.loss == straight.history.loss


def test_validation_and_callbacks_see_every_run():
    rng = np.random.default_rng(8)
    X, labels = rng.normal(size=(80, 4)), rng.integers(0, 3, 80)
    trainer = cprop.Trainer(make_net([4, 8, 3]), "cross_entropy", optimizer=cprop.LBFGS(max_iter=4))
    seen = []

    def stop_after_two(trainer, epoch, logs):
        seen.append((epoch, logs["loss"], logs["val_accuracy"]))
        return epoch == 2

    history = trainer.fit(X, labels, epochs=5, validation_data=(X[:20], labels[:20]),
                          callbacks=[stop_after_two])

    assert [epoch for epoch, _, _ in seen] == [1, 2] and len(history) == 2
    assert len(history.val_loss) == 2 and history.lr == []     # L-BFGS has no learning rate
    assert history.val_accuracy[-1] == trainer.evaluate(X[:20], labels[:20])["accuracy"]


def test_float32_networks_train_too():
    X, Y = linear_problem()
    net = cprop.Sequential([cprop.Dense(5, 2)], dtype=np.float32, seed=0)

    cprop.Trainer(net, "mse", optimizer=cprop.LBFGS(tol=1e-6)).fit(X, Y)

    W, b = ridge(X, Y, 0.0)
    assert net.params.dtype == np.float32
    assert_allclose(net.layers[0].W, W, rtol=1e-3, atol=1e-4)


def test_dropout_draws_one_set_of_masks_per_run():
    rng = np.random.default_rng(4)
    X, labels = rng.normal(size=(100, 4)), rng.integers(0, 3, 100)

    def fit():
        net = cprop.Sequential([cprop.Dense(4, 16, "relu"), cprop.Dropout(0.3), cprop.Dense(16, 3)],
                               dtype=np.float64, seed=0)
        opt = cprop.LBFGS(max_iter=30)
        cprop.Trainer(net, "cross_entropy", optimizer=opt, seed=0).fit(X, labels)
        return net, opt

    (one, opt), (two, _) = fit(), fit()
    # the same function at every evaluation: the line searches succeed, runs repeat exactly
    assert opt.result.nit == 30 and "ABNORMAL" not in opt.result.message
    assert_array_equal(one.params, two.params)


def overflowing_beyond(monkeypatch, x0, radius):
    """Make every evaluation farther than `radius` from x0 overflow; returns the list of
    the evaluations' distances from x0."""
    real = cprop.Sequential._batch_gradient
    distances = []

    def evaluate(self, *args, **kwargs):
        value = real(self, *args, **kwargs)
        distances.append(np.abs(self.params - x0).max())
        return np.inf if distances[-1] > radius else value

    monkeypatch.setattr(cprop.Sequential, "_batch_gradient", evaluate)
    return distances


@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
def test_a_run_that_meets_an_overflow_ends_at_the_last_finite_iterate(monkeypatch, on_divergence):
    """L-BFGS-B's line search cannot step past a point where the loss is not finite: the
    run ends at the last iterate, reported as a divergence (the weights kept finite)."""
    rng = np.random.default_rng(5)
    X, labels = rng.normal(size=(100, 4)), rng.integers(0, 3, 100)
    x0 = make_net([4, 8, 3]).params.copy()
    # the first 3 iterations stay within `radius` of x0, the run of 50 goes farther
    distances = overflowing_beyond(monkeypatch, x0, radius=np.inf)
    cprop.Trainer(make_net([4, 8, 3]), "cross_entropy", optimizer=cprop.LBFGS(max_iter=3)).fit(X, labels)
    radius = max(distances) * (1 + 1e-9)
    distances = overflowing_beyond(monkeypatch, x0, radius)
    net = make_net([4, 8, 3])
    opt = cprop.LBFGS(max_iter=50)
    trainer = cprop.Trainer(net, "cross_entropy", optimizer=opt, on_divergence=on_divergence)

    if on_divergence == "raise":
        with pytest.raises(cprop.DivergenceError, match="non-finite"):
            trainer.fit(X, labels)
    else:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            trainer.fit(X, labels)

    assert max(distances) > radius
    assert opt.result.overflowed and opt.result.status == 2 and "ABNORMAL" in opt.result.message
    assert opt.result.nit >= 3 and np.isfinite(opt.result.fun) and np.isfinite(opt.result.data_loss)
    assert_array_equal(net.params, opt.result.x)
    assert np.abs(net.params - x0).max() <= radius
    assert trainer.epochs_done == 0 and len(trainer.history) == 0


def test_a_start_that_overflows_diverges_and_leaves_the_weights(monkeypatch):
    rng = np.random.default_rng(7)
    X, labels = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    net = make_net([4, 8, 3])
    before = net.params.copy()
    overflowing_beyond(monkeypatch, before, radius=-1.0)     # everywhere
    opt = cprop.LBFGS()
    trainer = cprop.Trainer(net, "cross_entropy", optimizer=opt)

    with pytest.raises(cprop.DivergenceError, match="non-finite"):
        trainer.fit(X, labels)
    assert_array_equal(net.params, before)
    assert opt.result.overflowed and np.isnan(opt.result.data_loss)
    trainer.on_divergence = "warn"
    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = trainer.fit(X, labels)
    assert len(history) == 0 and trainer.epochs_done == 0
    assert_array_equal(net.params, before)


def test_ctrl_c_leaves_the_last_completed_iteration(monkeypatch):
    """Interrupted during iteration 4's line search, the network holds iterate 3: the
    weights a run of max_iter=3 ends on."""
    rng = np.random.default_rng(6)
    X, labels = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    stopped = make_net([4, 8, 3])
    opt = cprop.LBFGS(max_iter=3)
    cprop.Trainer(stopped, "cross_entropy", optimizer=opt).fit(X, labels)
    evaluations_in_3 = opt.result.nfev

    real = cprop.Sequential._batch_gradient
    calls = []

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == evaluations_in_3 + 1:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cprop.Sequential, "_batch_gradient", interrupt)
    interrupted = make_net([4, 8, 3])
    trainer = cprop.Trainer(interrupted, "cross_entropy", optimizer=cprop.LBFGS(max_iter=50))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, labels)

    assert_array_equal(interrupted.params, stopped.params)
    assert trainer.epochs_done == 0


@pytest.mark.parametrize("kwargs, error, word", [
    ({"max_iter": 0}, ValueError, "max_iter"),
    ({"max_iter": 2.5}, TypeError, "max_iter"),
    ({"max_fun": 0}, ValueError, "max_fun"),
    ({"tol": -1e-3}, ValueError, "tol"),
    ({"tol": float("nan")}, ValueError, "tol"),
    ({"history": 0}, ValueError, "history"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
], ids=str)
def test_bad_settings_are_refused(kwargs, error, word):
    with pytest.raises(error, match=word):
        cprop.LBFGS(**kwargs)
    opt = cprop.LBFGS()
    trainer = cprop.Trainer(make_net([4, 3]), "mse", optimizer=opt)
    setattr(opt, *next(iter(kwargs.items())))    # changed after construction: refused at fit
    with pytest.raises(error, match=word):
        trainer.fit(np.zeros((5, 4)), np.zeros((5, 3)))


def test_step_says_to_use_a_trainer():
    net = make_net([4, 3])
    net.forward(np.ones((2, 4)))
    net.backward(np.ones((2, 3)))
    with pytest.raises(TypeError, match="Trainer"):
        cprop.LBFGS().step(net)
