"""Training: the compiled epoch against the reference epoch, and real learning."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import cprop

import reference as ref
from conftest import LOSSES, TOLERANCES, activations_of, flat, layers_of, make_net, make_targets

# -- the bundled digits ---------------------------------------------------------

@pytest.fixture(scope="module")
def digits_split():
    X, y = cprop.datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(X))
    test, train = order[:len(X) // 5], order[len(X) // 5:]
    return X[train], y[train], X[test], y[test]


def digits_trainer(optimizer, seed=0):
    net = cprop.Sequential([cprop.Dense(64, 64, "relu"), cprop.Dense(64, 10)], seed=seed)
    return cprop.Trainer(net, loss="cross_entropy", optimizer=optimizer, batch_size=32, seed=seed)


@pytest.fixture(scope="module")
def digits_fit(digits_split):
    X, y, X_test, y_test = digits_split
    trainer = digits_trainer(cprop.SGD(lr=0.05, momentum=0.9))
    history = trainer.fit(X, y, epochs=30, validation_data=(X_test, y_test))
    return trainer, history


def test_load_digits():
    X, y = cprop.datasets.load_digits()

    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and set(np.unique(y)) == set(range(10))
    assert X.min() == 0 and X.max() == 1          # pixel counts 0..16, scaled by 1/16


def test_digits_reach_96_percent(digits_fit, digits_split):
    trainer, history = digits_fit
    _, _, X_test, y_test = digits_split

    result = trainer.evaluate(X_test, y_test)

    assert result["accuracy"] >= 0.96
    assert result["accuracy"] == history.val_accuracy[-1]
    assert result["loss"] == pytest.approx(history.val_loss[-1])
    assert history.loss[-1] < history.loss[0] / 5


def test_history_has_one_float_per_epoch(digits_fit):
    trainer, history = digits_fit

    assert history is trainer.history and len(history) == 30 == trainer.epochs_done
    for field in ("loss", "val_loss", "val_accuracy", "lr", "time", "samples_per_second"):
        values = getattr(history, field)
        assert len(values) == 30 and all(type(v) is float for v in values)
    assert all(0 <= a <= 1 for a in history.val_accuracy)


def test_same_seed_same_weights(digits_split, digits_fit):
    X, y, _, _ = digits_split
    trainer = digits_trainer(cprop.SGD(lr=0.05, momentum=0.9))

    trainer.fit(X, y, epochs=30)

    assert_array_equal(trainer.net.params, digits_fit[0].net.params)
    other = digits_trainer(cprop.SGD(lr=0.05, momentum=0.9), seed=1)
    other.fit(X, y, epochs=1)
    assert not np.array_equal(other.net.params, trainer.net.params)


def test_adam_trains_digits(digits_split):
    X, y, X_test, y_test = digits_split
    trainer = digits_trainer(cprop.Adam(lr=0.002))

    trainer.fit(X, y, epochs=15)

    assert trainer.evaluate(X_test, y_test)["accuracy"] >= 0.95


def test_predict_digits(digits_fit, digits_split):
    trainer, _ = digits_fit
    _, _, X_test, y_test = digits_split

    labels = trainer.predict(X_test)
    proba = trainer.predict_proba(X_test)

    assert labels.shape == (len(X_test),) and labels.dtype.kind == "i"
    assert_array_equal(labels, trainer.net.predict_raw(X_test).argmax(axis=1))
    assert np.mean(labels == y_test) == trainer.evaluate(X_test, y_test)["accuracy"]
    assert_allclose(proba.sum(axis=1), 1)
    assert_array_equal(proba.argmax(axis=1), labels)


# -- one epoch, against the reference ---------------------------------------------

SGD_CONFIG = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}


def epoch_data(loss, n=70, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)), make_targets(loss, n, 3, rng)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in order", "shuffled"])
@pytest.mark.parametrize("loss", LOSSES)
def test_fit_one_epoch_equals_reference_epoch(loss, shuffle):
    # n = 70 with batch 32: batches of 32, 32 and a ragged 6
    X, y = epoch_data(loss)
    net = make_net([6, 9, 7, 3], hidden="tanh", output="sigmoid" if loss == "mse" else "identity")
    layers, acts = layers_of(net), activations_of(net)
    trainer = cprop.Trainer(net, loss=loss, optimizer=cprop.SGD(**SGD_CONFIG), batch_size=32,
                            shuffle=shuffle, seed=7)

    history = trainer.fit(X, y, epochs=1)

    # the trainer draws each epoch's order from np.random.default_rng(seed)
    order = np.random.default_rng(7).permutation(70) if shuffle else np.arange(70)
    mean_loss = ref.train_epoch(layers, acts, X, y, loss, order, batch_size=32, **SGD_CONFIG)
    for layer, (W, b) in zip(net.layers, layers):
        assert_allclose(layer.W, W, **TOLERANCES[np.float64])
        assert_allclose(layer.b, b, **TOLERANCES[np.float64])
    assert history.loss == [pytest.approx(mean_loss, rel=1e-12)]


def test_fit_equals_the_same_steps_by_hand(dtype):
    X, y = epoch_data("cross_entropy")
    X = X.astype(dtype)
    net = make_net([6, 9, 7, 3], hidden="relu", dtype=dtype)
    by_hand = net.copy()
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(**SGD_CONFIG),
                            batch_size=32, shuffle=False)

    history = trainer.fit(X, y, epochs=1)

    optimizer, total = cprop.SGD(**SGD_CONFIG), 0.0
    for start in (0, 32, 64):
        Xb, yb = X[start:start + 32], y[start:start + 32]
        value, grad = cprop.losses.cross_entropy(by_hand.forward(Xb), yb)
        by_hand.backward(grad)
        optimizer.step(by_hand)
        total += value * len(Xb)
    # the same kernels in the same order: the same bits
    assert_array_equal(net.params, by_hand.params)
    assert_array_equal(trainer.optimizer.state[0], optimizer.state[0])
    assert history.loss[0] == pytest.approx(total / 70, rel=1e-12)


def test_second_epoch_reshuffles(dtype):
    X, y = epoch_data("mse", n=40)
    net = make_net([6, 5, 3], dtype=dtype)
    layers, acts = layers_of(net), activations_of(net)
    trainer = cprop.Trainer(net, loss="mse", optimizer=cprop.SGD(lr=0.05), batch_size=16, seed=3)

    trainer.fit(X, y, epochs=2)

    rng = np.random.default_rng(3)
    for _ in range(2):
        ref.train_epoch(layers, acts, X, y, "mse", rng.permutation(40), batch_size=16, lr=0.05)
    for layer, (W, b) in zip(net.layers, layers):
        assert_allclose(layer.W, W, **TOLERANCES[dtype])
        assert_allclose(layer.b, b, **TOLERANCES[dtype])


@pytest.mark.parametrize("sizes, batch_size, n, loss", [
    ([300, 200, 10], 256, 600, "cross_entropy"),      # batch wider than the layers: threads split rows
    ([300, 400, 300, 10], 64, 129, "cross_entropy"),  # layers wider than the batch: columns; last batch 1 row
    ([100, 50, 4], 256, 513, "mse"),                  # a last batch of one row: one thread has none
], ids=["rows", "columns", "one-row-batch"])
def test_threaded_epoch_equals_reference_epoch(sizes, batch_size, n, loss):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, sizes[-1], n) if loss == "cross_entropy" else rng.normal(size=(n, sizes[-1]))
    results = []
    for n_threads in (1, 2):
        net = make_net(sizes, hidden="relu")
        layers, acts = layers_of(net), activations_of(net)
        trainer = cprop.Trainer(net, loss=loss, optimizer=cprop.SGD(lr=0.1, momentum=0.9),
                                batch_size=batch_size, seed=0, n_threads=n_threads)
        history = trainer.fit(X, y, epochs=1)
        results.append((net.params, history.loss[-1]))

    order = np.random.default_rng(0).permutation(n)
    ref.train_epoch(layers, acts, X, y, loss, order, batch_size=batch_size, lr=0.1, momentum=0.9)
    assert_allclose(results[1][0], results[0][0], **TOLERANCES[np.float64])
    assert_allclose(results[1][0], flat(layers), **TOLERANCES[np.float64])
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-12)


@pytest.mark.parametrize("optimizer", [
    lambda: cprop.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda: cprop.Adam(lr=0.01, weight_decay=0.01),
    lambda: cprop.AdamW(lr=0.01),
    lambda: cprop.Adam(lr=0.01, sklearn_style=True),
], ids=["sgd-nesterov", "adam", "adamw", "adam-sklearn"])
def test_first_layer_wider_than_the_batch_steps_the_same_on_any_thread_count(optimizer):
    # 200 -> 288 over batches of 32: 2 or 3 threads split the first layer's columns in the
    # forward pass and its rows in the step; 1 thread steps all of W
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(133, 200)), rng.integers(0, 5, 133)     # a ragged last batch of 5
    results = []
    for n_threads in (1, 2, 3):
        net = make_net([200, 288, 5], hidden="relu")
        trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=optimizer(), batch_size=32, seed=0,
                                n_threads=n_threads)
        trainer.fit(X, y, epochs=3)
        results.append((net.params, trainer.optimizer.state))
    for params, state in results[1:]:
        assert_allclose(params, results[0][0], **TOLERANCES[np.float64])
        for got, want in zip(state, results[0][1]):
            assert_allclose(got, want, **TOLERANCES[np.float64])


def test_batch_larger_than_data_is_one_full_batch():
    X, y = epoch_data("mse", n=10)
    net = make_net([6, 5, 3])
    layers, acts = layers_of(net), activations_of(net)

    cprop.Trainer(net, loss="mse", optimizer=cprop.SGD(lr=0.1), batch_size=64, shuffle=False).fit(X, y)

    ref.train_epoch(layers, acts, X, y, "mse", np.arange(10), batch_size=10, lr=0.1)
    assert_allclose(net.params, flat(layers), **TOLERANCES[np.float64])


# -- real learning on small synthetic problems ------------------------------------

def test_mse_regression_learns():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (256, 2))
    y = np.sin(np.pi * X[:, 0]) * np.cos(0.5 * np.pi * X[:, 1])       # smooth target
    net = cprop.Sequential([cprop.Dense(2, 32, "tanh"), cprop.Dense(32, 32, "tanh"), cprop.Dense(32, 1)],
                           seed=0)
    trainer = cprop.Trainer(net, loss="mse", optimizer=cprop.Adam(lr=0.01), batch_size=32, seed=0)

    history = trainer.fit(X, y, epochs=100)

    assert history.loss[-1] < 0.05 * history.loss[0]          # falls twenty-fold and more
    predicted = trainer.predict(X)
    assert predicted.shape == (256,) and predicted.dtype == np.float32
    assert_array_equal(predicted, net.predict_raw(X)[:, 0])
    assert np.mean((predicted - y) ** 2) == pytest.approx(trainer.evaluate(X, y)["loss"], rel=1e-5)
    assert "accuracy" not in trainer.evaluate(X, y)


def circle_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 2))
    return X, (np.sum(X ** 2, axis=1) < 0.5).astype(np.float64)


def test_binary_cross_entropy_learns_with_1d_and_2d_targets():
    X, y = circle_data()
    trainers = []
    for targets in (y, y[:, None]):
        net = cprop.Sequential([cprop.Dense(2, 16, "tanh"), cprop.Dense(16, 1)], seed=0)
        trainer = cprop.Trainer(net, loss="binary_cross_entropy", optimizer=cprop.Adam(lr=0.02),
                                batch_size=32, seed=0)
        history = trainer.fit(X, targets, epochs=60)
        assert history.loss[-1] < 0.5 * history.loss[0]
        assert trainer.evaluate(X, targets)["accuracy"] >= 0.95
        trainers.append(trainer)

    flat, column = trainers
    assert_array_equal(flat.net.params, column.net.params)      # the same targets, either shape
    labels = flat.predict(X)
    assert labels.shape == (300,) and set(np.unique(labels)) == {0, 1}
    assert_array_equal(labels, flat.net.predict_raw(X)[:, 0] > 0)
    assert_allclose(flat.predict_proba(X)[:, 0], 1 / (1 + np.exp(-flat.net.predict_raw(X)[:, 0].astype(float))))


def test_predict_multi_output():
    X, y = circle_data(n=20)
    Y = np.stack([y, 1 - y, y], axis=1)
    net = cprop.Sequential([cprop.Dense(2, 4, "tanh"), cprop.Dense(4, 3)], seed=0)
    raw = net.predict_raw(X)

    binary = cprop.Trainer(net, loss="binary_cross_entropy").predict(X)
    values = cprop.Trainer(net, loss="mse").predict(X)

    assert binary.shape == (20, 3) and set(np.unique(binary)) <= {0, 1}
    assert_array_equal(binary, raw > 0)
    assert_array_equal(values, raw)
    with pytest.raises(ValueError):
        cprop.Trainer(net, loss="mse").predict_proba(X)
    assert cprop.Trainer(net, loss="binary_cross_entropy").evaluate(X, Y)["accuracy"] == np.mean((raw > 0) == Y)


def test_divergence_raises_and_keeps_finite_weights():
    X, y = epoch_data("mse")
    net = make_net([6, 9, 3], hidden="relu")
    trainer = cprop.Trainer(net, loss="mse", optimizer=cprop.SGD(lr=1e30), batch_size=8, shuffle=False)

    with pytest.raises(cprop.DivergenceError):
        trainer.fit(X, y * 1e10, epochs=3)

    assert np.isfinite(net.params).all()
    assert trainer.epochs_done == 0
