"""Gradient clipping by global norm (``clip_norm`` of SGD, Adam and AdamW), as
torch.nn.utils.clip_grad_norm_: against the NumPy reference, on any thread count, in the
compiled epoch and in Optimizer.step, against PyTorch when installed, and its checks."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import cprop

import reference as ref
from conftest import TOLERANCES, activations_of, flat, layers_of, make_net


def data(n, n_in, n_out, loss, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in))
    y = rng.integers(0, n_out, n) if loss == "cross_entropy" else 3 * rng.normal(size=(n, n_out))
    return X, y


def first_batch_norm(net, X, y, loss, batch_size, order):
    """‖g‖ of the first minibatch's gradient, by the reference."""
    layers, acts = layers_of(net), activations_of(net)
    rows = order[:batch_size]
    outputs = ref.forward(layers, acts, X[rows])
    _, G = ref.LOSSES[loss](outputs[-1], np.asarray(y)[rows])
    grads = [g for pair in ref.backward(layers, acts, X[rows], outputs, G) for g in pair]
    return ref.clip_grads(grads, 1.0)[1]


@pytest.mark.parametrize("sizes, batch_size, n, loss", [
    ([30, 20, 4], 64, 150, "cross_entropy"),          # batch wider than the layers: threads split rows
    ([40, 300, 200, 3], 64, 129, "cross_entropy"),    # layers wider than the batch: columns; last batch 1 row
    ([10, 8, 2], 16, 70, "mse"),
], ids=["rows", "columns", "mse"])
def test_clipped_epoch_equals_reference_on_any_thread_count(sizes, batch_size, n, loss):
    X, y = data(n, sizes[0], sizes[-1], loss)
    order = np.random.default_rng(0).permutation(n)
    # below the first batch's norm, so that steps are clipped
    clip = 0.3 * first_batch_norm(make_net(sizes, hidden="relu"), X, y, loss, batch_size, order)
    results = []
    for n_threads in (1, 2, 3):
        net = make_net(sizes, hidden="relu")
        trainer = cprop.Trainer(net, loss=loss, batch_size=batch_size, seed=0, n_threads=n_threads,
                                optimizer=cprop.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3, clip_norm=clip))
        trainer.fit(X, y, epochs=1)
        results.append(net.params)

    net = make_net(sizes, hidden="relu")
    layers, acts = layers_of(net), activations_of(net)
    ref.train_epoch(layers, acts, X, y, loss, order, batch_size=batch_size, lr=0.1, momentum=0.9,
                    weight_decay=1e-3, clip_norm=clip)
    unclipped = layers_of(net)
    ref.train_epoch(unclipped, acts, X, y, loss, order, batch_size=batch_size, lr=0.1, momentum=0.9,
                    weight_decay=1e-3)
    for params in results:
        assert_allclose(params, flat(layers), **TOLERANCES[np.float64])
        # (products of other shapes round differently: not bit-equal across thread counts)
        assert_allclose(params, results[0], rtol=1e-12, atol=1e-15)
    assert not np.allclose(results[0], flat(unclipped), rtol=1e-3, atol=1e-6)   # clipping did act


@pytest.mark.parametrize("optimizer", [
    lambda clip: cprop.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, clip_norm=clip),
    lambda clip: cprop.Adam(lr=0.01, weight_decay=0.01, clip_norm=clip),
    lambda clip: cprop.AdamW(lr=0.01, clip_norm=clip),
], ids=["sgd-nesterov", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_a_norm_above_every_gradient_changes_nothing(optimizer, dtype):
    # the clipped path (all gradients, the norm, then the step) takes the same steps, bit for bit
    X, y = data(133, 200, 5, "cross_entropy", seed=1)
    for n_threads in (1, 2):
        results = []
        for clip in (None, 1e30):
            net = make_net([200, 288, 5], hidden="relu", dtype=dtype)
            trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=optimizer(clip), batch_size=32,
                                    seed=0, n_threads=n_threads)
            trainer.fit(X.astype(dtype), y, epochs=2)
            results.append(net.params)
        assert_array_equal(results[1], results[0])


def test_one_clipped_sgd_step_moves_the_parameters_by_lr_times_clip_norm():
    X, y = data(64, 12, 3, "cross_entropy")
    net = make_net([12, 16, 3])
    before = net.params.copy()
    norm = first_batch_norm(net, X, y, "cross_entropy", 64, np.arange(64))
    clip = norm / 10
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.5, clip_norm=clip),
                            batch_size=64, shuffle=False)
    trainer.fit(X, y, epochs=1)
    step = np.linalg.norm(net.params - before)
    assert step == pytest.approx(0.5 * clip * norm / (norm + 1e-6), rel=1e-10)
    # the gradient the step took, as the network keeps it: clipped
    assert np.linalg.norm(net.grads) == pytest.approx(clip * norm / (norm + 1e-6), rel=1e-10)


def test_optimizer_step_clips_the_networks_gradient():
    # forward/backward/step by hand, as a custom loop would, against the reference
    X, y = data(40, 6, 2, "mse")
    net = make_net([6, 9, 2])
    layers, acts = layers_of(net), activations_of(net)
    opt = cprop.SGD(lr=0.1, momentum=0.5, clip_norm=0.05)
    for _ in range(3):
        out = net.forward(X, training=True)
        _, grad = ref.mse(out, y)
        net.backward(grad)
        opt.step(net)
    params = [p for pair in layers for p in pair]
    velocity = [np.zeros_like(p) for p in params]
    for _ in range(3):
        outputs = ref.forward(layers, acts, X)
        _, G = ref.mse(outputs[-1], y)
        grads, norm = ref.clip_grads([g for pair in ref.backward(layers, acts, X, outputs, G) for g in pair],
                                     0.05)
        assert norm > 0.05
        ref.sgd_step(params, grads, velocity, lr=0.1, momentum=0.5)
    assert_allclose(net.params, flat(layers), **TOLERANCES[np.float64])


def test_clipped_training_matches_pytorch():
    torch = pytest.importorskip("torch")
    from test_gradients import torch_model
    X, y = data(96, 10, 4, "cross_entropy", seed=2)
    net = make_net([10, 32, 4], hidden="relu")
    model = torch_model(net)
    trainer = cprop.Trainer(net, loss="cross_entropy", batch_size=32, shuffle=False,
                            optimizer=cprop.Adam(lr=0.02, weight_decay=0.01, clip_norm=0.2))
    trainer.fit(X, y, epochs=2)

    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=0.01)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    norms = []
    for _ in range(2):
        for start in range(0, 96, 32):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(Xt[start:start + 32]), yt[start:start + 32])
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)))
            opt.step()
    assert max(norms) > 0.2                       # some steps were clipped
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for layer, linear in zip(net.layers, linears):
        assert_allclose(layer.W, linear.weight.detach().numpy().T, rtol=1e-9, atol=1e-12)
        assert_allclose(layer.b, linear.bias.detach().numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("1", TypeError), (True, TypeError),
])
def test_clip_norm_is_checked(value, error):
    with pytest.raises(error, match="clip_norm"):
        cprop.SGD(clip_norm=value)
    with pytest.raises(error, match="clip_norm"):
        cprop.AdamW(clip_norm=value)
    # set after construction: refused when the trainer reads it, before anything runs
    opt = cprop.Adam()
    opt.clip_norm = value
    net = make_net([3, 2])
    before = net.params.copy()
    with pytest.raises(error, match="clip_norm"):
        cprop.Trainer(net, loss="mse", optimizer=opt).fit(np.ones((4, 3)), np.ones((4, 2)))
    assert_array_equal(net.params, before)


def test_clip_norm_is_saved_with_the_trainer(tmp_path):
    X, y = data(50, 5, 2, "cross_entropy")
    trainer = cprop.Trainer(make_net([5, 4, 2]), loss="cross_entropy", seed=0,
                            optimizer=cprop.SGD(lr=0.1, momentum=0.9, clip_norm=0.25))
    trainer.fit(X, y, epochs=1)
    trainer.save(tmp_path / "t.npz")
    loaded = cprop.Trainer.load(tmp_path / "t.npz")
    assert loaded.optimizer.clip_norm == 0.25
    assert "clip_norm=0.25" in repr(loaded.optimizer)
    assert "clip_norm" not in repr(cprop.SGD())
    # a config from before clip_norm existed (no key) or with 0 means no clipping
    cfg = cprop.SGD(lr=0.1).config()
    assert cfg["clip_norm"] == 0.0
    del cfg["clip_norm"]
    assert cprop.SGD.from_config(cfg).clip_norm is None


def test_lbfgs_refuses_a_clip_norm():
    opt = cprop.LBFGS()
    opt.clip_norm = 1.0
    with pytest.raises(ValueError, match="L-BFGS takes no clip_norm"):
        cprop.Trainer(make_net([3, 2]), loss="mse", optimizer=opt)
    opt.clip_norm = None
    trainer = cprop.Trainer(make_net([3, 2]), loss="mse", optimizer=opt)
    opt.clip_norm = 1.0     # set afterwards: refused when the fit reads the settings
    with pytest.raises(ValueError, match="L-BFGS takes no clip_norm"):
        trainer.fit(np.ones((4, 3)), np.ones((4, 2)))


def test_a_float32_gradient_near_the_top_of_its_range_is_clipped_not_zeroed():
    # ‖g‖ near float32's largest: the factor (about 1e-38 here) is below float32's normal
    # range, where a flushed float32 factor would zero the step; the product in double does not
    net = cprop.Sequential([cprop.Dense(1, 1)], seed=0)
    net.layers[0].W[...] = 1.0
    net.layers[0].b[...] = 0.0
    net.forward(np.ones((1, 1), np.float32), training=True)
    net.backward(np.full((1, 1), 3e38, np.float32))       # dW = db = 3e38
    before = net.params.copy()
    cprop.SGD(lr=1.0, clip_norm=1.0).step(net)
    step = before - net.params
    assert_allclose(step, [1 / np.sqrt(2)] * 2, rtol=1e-6)
