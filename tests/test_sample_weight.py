"""Sample weights: the weighted losses against the NumPy reference, a weighted epoch
against the reference epoch, and the two properties that define them: weight 0 drops a
sample, integer weight k counts it k times."""
import numpy as np
import pytest
from numpy.testing import assert_allclose

import cprop
from cprop._lazy import core
from cprop.losses import loss_code, prepare_targets

import reference as ref
from conftest import LOSSES, TOLERANCES, activations_of, flat, layers_of, make_net, make_targets


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = cprop._threads._num_threads
    cprop.set_num_threads(1)
    yield
    cprop.set_num_threads(before)


def integer_weights(n, seed=0):
    """Weights 0-3, some of each."""
    return np.random.default_rng(seed).integers(0, 4, n).astype(np.float64)


# -- the weighted losses ----------------------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
def test_weighted_loss_kernels_equal_the_reference(loss, dtype, tol, rng):
    out = rng.normal(size=(9, 4)).astype(dtype)
    y = make_targets(loss, 9, 4, rng)
    w = rng.uniform(0, 3, 9)
    w[2] = 0
    T, labels = prepare_targets(loss, y, 9, 4, dtype)
    G = np.empty_like(out)

    # the kernel divides by the row count: scale n / Σw makes its sum the weighted mean
    value = core.loss(loss_code(loss), out, T, labels, G, 9 / w.sum(), w.astype(dtype))

    ref_value, ref_G = ref.weighted(loss, out.astype(np.float64), y, w)
    assert value == pytest.approx(ref_value, rel=tol["rtol"])
    assert_allclose(G, ref_G, **tol)


@pytest.mark.parametrize("loss", LOSSES)
def test_unit_weights_are_no_weights(loss, rng):
    out = rng.normal(size=(7, 3))
    y = make_targets(loss, 7, 3, rng)
    T, labels = prepare_targets(loss, y, 7, 3, np.float64)
    G, G_unit = np.empty_like(out), np.empty_like(out)

    value = core.loss(loss_code(loss), out, T, labels, G)
    unit = core.loss(loss_code(loss), out, T, labels, G_unit, 1.0, np.ones(7))

    assert unit == pytest.approx(value, rel=1e-14)
    assert_allclose(G_unit, G, rtol=1e-14, atol=1e-17)


# -- a weighted epoch -------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True], ids=["in order", "shuffled"])
@pytest.mark.parametrize("loss", LOSSES)
def test_weighted_epoch_equals_reference_epoch(loss, shuffle):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(40, 6)), make_targets(loss, 40, 3, rng)
    w = rng.uniform(0.5, 2, 40)
    w[7:14] = 0                       # in order, batch 1 (rows 7-13) weighs nothing: skipped
    net = make_net([6, 9, 3], hidden="tanh")
    layers, acts = layers_of(net), activations_of(net)
    trainer = cprop.Trainer(net, loss=loss, optimizer=cprop.SGD(lr=0.1, momentum=0.9), batch_size=7,
                            shuffle=shuffle, seed=5)

    history = trainer.fit(X, y, sample_weight=w)

    order = np.random.default_rng(5).permutation(40) if shuffle else np.arange(40)
    mean_loss = ref.train_epoch(layers, acts, X, y, loss, order, batch_size=7, lr=0.1, momentum=0.9,
                                weights=w)
    assert_allclose(net.params, flat(layers), **TOLERANCES[np.float64])
    assert history.loss[0] == pytest.approx(mean_loss, rel=1e-12)


def test_a_skipped_batch_is_no_step():
    """Adam counts only the batches it stepped on: a batch of weight 0 is as if absent."""
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(12, 4)), rng.integers(0, 3, 12)
    w = np.r_[np.zeros(4), np.ones(8)]
    weighted, absent = make_net([4, 5, 3]), make_net([4, 5, 3])
    adam_w, adam_a = cprop.Adam(lr=0.01), cprop.Adam(lr=0.01)

    cprop.Trainer(weighted, "cross_entropy", optimizer=adam_w, batch_size=4, shuffle=False).fit(
        X, y, epochs=2, sample_weight=w)
    cprop.Trainer(absent, "cross_entropy", optimizer=adam_a, batch_size=4, shuffle=False).fit(
        X[4:], y[4:], epochs=2)

    assert adam_w.step_count == adam_a.step_count == 4
    assert_allclose(weighted.params, absent.params, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("optimizer", [lambda: cprop.SGD(lr=0.1, momentum=0.9, weight_decay=0.1),
                                       lambda: cprop.Adam(lr=0.01, weight_decay=0.1)],
                         ids=["sgd", "adam"])
@pytest.mark.parametrize("loss", LOSSES)
def test_zero_weights_drop_and_integer_weights_repeat_rows(loss, optimizer):
    """Full batches, so that the same rows meet in each: weight 0 is the row removed,
    weight k the row k times (decay per sample divides by Σw, the repeated rows' count)."""
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(30, 5)), make_targets(loss, 30, 3, rng)
    w = integer_weights(30)
    repeat = np.repeat(np.arange(30), w.astype(int))
    nets = []
    for X_fit, y_fit, weights in [(X, y, w), (X[repeat], y[repeat], None)]:
        net = make_net([5, 8, 3])
        opt = optimizer()
        opt.decay_per_sample = True
        trainer = cprop.Trainer(net, loss, optimizer=opt, batch_size=100, shuffle=False)
        trainer.fit(X_fit, y_fit, epochs=3, sample_weight=weights)
        nets.append((net, trainer.history.loss))

    (weighted, loss_w), (repeated, loss_r) = nets
    assert_allclose(weighted.params, repeated.params, rtol=1e-12, atol=1e-14)
    assert_allclose(loss_w, loss_r, rtol=1e-12)


def test_lbfgs_minimizes_the_weighted_mean_loss():
    """A linear network under L-BFGS reaches weighted least squares in closed form."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 4))
    Y = X @ rng.normal(size=(4, 2)) + rng.normal(size=(60, 2))      # noisy: weights matter
    w = integer_weights(60, seed=1)
    net = cprop.Sequential([cprop.Dense(4, 2)], dtype=np.float64, seed=0)
    opt = cprop.LBFGS(tol=1e-10, weight_decay=6.0)
    opt.decay_bias, opt.decay_per_sample = False, True

    cprop.Trainer(net, "mse", optimizer=opt).fit(X, Y, sample_weight=w)

    # argmin Σ w_i‖x_i W + b - y_i‖²/(m Σw) + (6/Σw)/2·‖W‖²
    X1, penalty = np.c_[X, np.ones(60)], 6.0 / w.sum()
    A = 2 * X1.T @ (w[:, None] * X1) / (2 * w.sum()) + penalty * np.diag([1, 1, 1, 1, 0])
    Wb = np.linalg.solve(A, 2 * X1.T @ (w[:, None] * Y) / (2 * w.sum()))
    assert opt.result.success
    assert_allclose(net.layers[0].W, Wb[:4], rtol=0, atol=1e-5)
    assert_allclose(net.layers[0].b, Wb[4], rtol=0, atol=1e-5)


def test_weighted_fit_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(6)
    X, y = rng.normal(size=(300, 40)), rng.integers(0, 5, 300)
    w = rng.uniform(0, 2, 300)
    results = []
    for n_threads in (1, 2):
        net = make_net([40, 64, 5], hidden="relu")
        trainer = cprop.Trainer(net, "cross_entropy", optimizer=cprop.Adam(lr=0.01), batch_size=100,
                                seed=0, n_threads=n_threads)
        results.append((net.params, trainer.fit(X, y, epochs=2, sample_weight=w).loss))

    assert_allclose(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    assert_allclose(results[1][1], results[0][1], rtol=1e-12)


def test_float32_networks_take_weights_in_their_dtype():
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    w = integer_weights(20)
    repeat = np.repeat(np.arange(20), w.astype(int))
    a, b = make_net([4, 6, 3], dtype=np.float32), make_net([4, 6, 3], dtype=np.float32)

    cprop.Trainer(a, "cross_entropy", batch_size=64, shuffle=False).fit(X, y, sample_weight=w)
    cprop.Trainer(b, "cross_entropy", batch_size=64, shuffle=False).fit(X[repeat], y[repeat])

    assert_allclose(a.params, b.params, **TOLERANCES[np.float32])


# -- what is refused ---------------------------------------------------------------------

@pytest.mark.parametrize("weights, error, words", [
    (np.ones(9), ValueError, "shape"),
    (np.ones((10, 1)), ValueError, "shape"),
    (-np.ones(10), ValueError, ">= 0"),
    (np.r_[np.ones(9), np.nan], ValueError, "NaN"),
    (np.r_[np.ones(9), np.inf], ValueError, "NaN or infinite"),
    (np.zeros(10), ValueError, "non-zero"),
    (["a"] * 10, TypeError, "real numbers"),
], ids=["short", "2-D", "negative", "nan", "inf", "all-zero", "strings"])
def test_bad_weights_are_refused_before_training(weights, error, words):
    net = make_net([3, 2])
    before = net.params.copy()
    trainer = cprop.Trainer(net, "mse")

    with pytest.raises(error, match=words):
        trainer.fit(np.ones((10, 3)), np.ones((10, 2)), sample_weight=weights)
    assert_allclose(net.params, before, rtol=0, atol=0)
    assert trainer.epochs_done == 0


def test_a_validation_split_that_leaves_only_zero_weights_is_refused():
    trainer = cprop.Trainer(make_net([3, 2]), "mse", seed=0)
    w = np.zeros(10)
    w[np.random.default_rng(0).permutation(10)[:2]] = 1     # the rows the split holds out
    with pytest.raises(ValueError, match="weight 0"):
        trainer.fit(np.ones((10, 3)), np.ones((10, 2)), validation_split=0.2, sample_weight=w)
