"""The layer kinds beyond Dense (Dropout, BatchNorm, LayerNorm) and the activations beyond
the first five, held against NumPy formulas, finite differences and PyTorch's autograd
(skipped without torch), in float32 and float64; training with them reproducible and
resumable; the compiled plan's codes the ones the Python tables use."""
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import cprop
from cprop._lazy import core as _core

import reference as ref

TOL = {np.float32: {"rtol": 2e-4, "atol": 2e-5}, np.float64: {"rtol": 1e-9, "atol": 1e-11}}
NEW_ACTIVATIONS = ["elu", "softplus", "gelu", "gelu_tanh", "silu"]


# -- the NumPy oracle (tests/reference.py) --------------------------------------------------

REFERENCE = {name: ref.ACTIVATIONS[name] for name in NEW_ACTIVATIONS}
REFERENCE["leaky_relu_0.2"] = lambda z: np.where(z > 0, z, 0.2 * z)


def numeric_derivative(f, z, h=1e-6):
    return (f(z + h) - f(z - h)) / (2 * h)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("activation", NEW_ACTIVATIONS + ["leaky_relu_0.2"])
def test_activation_forward_and_derivative_match_the_formulas(activation, dtype, rng):
    name, slope = ("leaky_relu", 0.2) if activation == "leaky_relu_0.2" else (activation, 0.01)
    z = np.concatenate([rng.normal(0, 3, 200), [-30, -5, -1e-3, 0, 1e-3, 5, 19.9, 20.1, 30]])
    if name == "leaky_relu":
        z = z[np.abs(z) > 1e-5]          # no derivative at the kink
    Z = z.reshape(-1, 1).astype(dtype)
    Y = np.empty_like(Z)
    _core.dense_forward(Z, np.ones((1, 1), dtype), np.zeros(1, dtype), Y, _core.ACTIVATIONS[name], 1, slope)
    assert_allclose(Y[:, 0], REFERENCE[activation](z.astype(dtype).astype(np.float64)), **TOL[dtype])

    G = np.ones_like(Z)
    delta = np.empty_like(Z)
    _core.activation_grad(G, Y, delta, _core.ACTIVATIONS[name], slope,
                          Z if name in _core.NEEDS_Z else None)
    expected = numeric_derivative(REFERENCE[activation], z.astype(dtype).astype(np.float64))
    tol = {"rtol": 1e-3, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-6, "atol": 1e-7}
    assert_allclose(delta[:, 0], expected, **tol)


def test_which_activations_keep_the_pre_activation():
    # f'(z) of these cannot be written through y = f(z)
    assert _core.NEEDS_Z == {"gelu", "gelu_tanh", "silu"}


def test_python_tables_take_the_compiled_codes():
    from cprop.activations import TORCH, activation_code
    from cprop.layers import LAYERS
    assert set(TORCH) == set(_core.ACTIVATIONS)
    assert all(activation_code(name) == code for name, code in _core.ACTIVATIONS.items())
    assert set(LAYERS) == set(_core.LAYER_KINDS)
    assert cprop.SGD().kind == _core.OPTIMIZERS["sgd"] and cprop.AdamW().kind == _core.OPTIMIZERS["adam"]
    assert set(cprop.losses.LOSSES) == set(_core.LOSSES)
    assert all(cprop.losses.LOSSES[name] == code for name, code in _core.LOSSES.items())


@pytest.mark.parametrize("kind", ["layernorm", "batchnorm"])
def test_normalization_forward_matches_the_formula(kind, dtype, rng):
    n = 7
    layer = cprop.LayerNorm(n, eps=1e-3) if kind == "layernorm" else cprop.BatchNorm(n, eps=1e-3)
    net = cprop.Sequential([cprop.Dense(4, n), layer], dtype=dtype, seed=0)
    layer.gamma = rng.uniform(0.5, 2, n)
    layer.beta = rng.normal(size=n)
    X = rng.normal(size=(33, 4)).astype(dtype)
    hidden = X.astype(np.float64) @ net.layers[0].W.astype(np.float64) + net.layers[0].b
    formula = ref.layernorm if kind == "layernorm" else ref.batchnorm_train
    expected = formula(hidden, layer.gamma.astype(np.float64), layer.beta.astype(np.float64), 1e-3)
    assert_allclose(net.forward(X, training=True), expected, **TOL[dtype])
    if kind == "batchnorm":
        # running estimates moved by momentum 0.1 from (0, 1), the variance unbiased
        assert_allclose(layer.running_mean, 0.1 * hidden.mean(axis=0), **TOL[dtype])
        assert_allclose(layer.running_var, 0.9 + 0.1 * hidden.var(axis=0, ddof=1), **TOL[dtype])
        evaluated = ref.batchnorm_eval(hidden, layer.gamma.astype(np.float64), layer.beta.astype(np.float64),
                                       layer.running_mean.astype(np.float64),
                                       layer.running_var.astype(np.float64), 1e-3)
        assert_allclose(net.predict_raw(X), evaluated, **TOL[dtype])
    else:
        assert_allclose(net.predict_raw(X), expected, **TOL[dtype])


# -- finite differences ---------------------------------------------------------------------

KIND_NETWORKS = {
    "dense-new-activations": lambda: [cprop.Dense(5, 6, "gelu"), cprop.Dense(6, 6, "silu"),
                                      cprop.Dense(6, 6, "elu"), cprop.Dense(6, 5, "softplus"),
                                      cprop.Dense(5, 5, "gelu_tanh"),
                                      cprop.Dense(5, 3, "leaky_relu", negative_slope=0.2)],
    "batchnorm": lambda: [cprop.Dense(5, 6), cprop.BatchNorm(6, activation="gelu"), cprop.Dense(6, 3)],
    "layernorm": lambda: [cprop.Dense(5, 6), cprop.LayerNorm(6, activation="tanh"), cprop.Dense(6, 3)],
    "dropout": lambda: [cprop.Dense(5, 6, "relu"), cprop.Dropout(0.4), cprop.Dense(6, 3)],
    "input-norms": lambda: [cprop.BatchNorm(5), cprop.LayerNorm(5, activation="silu"), cprop.Dropout(0.2),
                            cprop.Dense(5, 3)],
    "no-affine": lambda: [cprop.Dense(5, 6), cprop.BatchNorm(6, affine=False, activation="relu"),
                          cprop.LayerNorm(6, elementwise_affine=False), cprop.Dense(6, 3)],
}


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("case", KIND_NETWORKS)
def test_gradient_check_on_every_kind(case, loss, rng):
    net = cprop.Sequential(KIND_NETWORKS[case](), dtype="float64", seed=1)
    X = rng.normal(size=(9, 5))
    y = rng.integers(0, 3, 9) if loss == "cross_entropy" else rng.normal(size=(9, 3))
    result = cprop.gradient_check(net, X, y, loss=loss, seed=3)
    assert result.passed, result


# -- PyTorch's autograd -------------------------------------------------------------------------

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def torch_model(torch, dtype):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Dropout(0.0),
                          nn.Linear(16, 12), nn.LayerNorm(12), nn.SiLU(),
                          nn.Linear(12, 10), nn.ELU(), nn.Linear(10, 8), nn.GELU(approximate="tanh"),
                          nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 8), nn.LeakyReLU(0.2),
                          nn.Linear(8, 3))
    with torch.no_grad():                  # non-trivial affine parameters and running statistics
        for m in model:
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.to(dtype)


def test_from_torch_to_torch_keeps_modules_order_and_keys(torch):
    model = torch_model(torch, torch.float32)
    net = cprop.Sequential.from_torch(model)
    back = net.to_torch()
    assert [type(m).__name__ for m in back] == [type(m).__name__ for m in model]
    assert list(back.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        assert_array_equal(back.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    assert back[10].approximate == "tanh" and back[14].negative_slope == 0.2


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_training_pass_matches_torch_autograd(torch, np_dtype, rng):
    tdtype = torch.float64 if np_dtype == np.float64 else torch.float32
    model = torch_model(torch, tdtype)
    net = cprop.Sequential.from_torch(model)
    X = rng.normal(size=(64, 6)).astype(np_dtype)
    y = rng.integers(0, 3, 64)
    tol = TOL[np_dtype] if np_dtype == np.float64 else {"rtol": 2e-3, "atol": 2e-4}

    # evaluation mode: running statistics
    model.eval()
    with torch.no_grad():
        assert_allclose(net.predict_raw(X), model(torch.from_numpy(X)).numpy(), **tol)

    # training mode: batch statistics, gradients of every parameter, running statistics moved
    model.train()
    out_t = model(torch.from_numpy(X))
    loss_t = torch.nn.functional.cross_entropy(out_t, torch.from_numpy(y))
    loss_t.backward()
    out = net.forward(X, training=True)
    loss, grad = cprop.losses.cross_entropy(out, y)
    net.backward(grad)
    assert_allclose(out, out_t.detach().numpy(), **tol)
    assert loss == pytest.approx(loss_t.item(), rel=tol["rtol"])
    grads_t = {name: p.grad.numpy() for name, p in model.named_parameters()}
    cprop_layers = list(net.layers)
    index = 0
    for i, m in enumerate(model):
        if isinstance(m, torch.nn.Linear):
            layer = cprop_layers[index]
            assert_allclose(layer.dW, grads_t[f"{i}.weight"].T, **tol, err_msg=f"{i}.weight")
            assert_allclose(layer.db, grads_t[f"{i}.bias"], **tol, err_msg=f"{i}.bias")
        elif isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)):
            layer = cprop_layers[index]
            assert_allclose(layer.dgamma, grads_t[f"{i}.weight"], **tol, err_msg=f"{i}.weight")
            assert_allclose(layer.dbeta, grads_t[f"{i}.bias"], **tol, err_msg=f"{i}.bias")
            if isinstance(m, torch.nn.BatchNorm1d):
                assert_allclose(layer.running_mean, m.running_mean.numpy(), **tol)
                assert_allclose(layer.running_var, m.running_var.numpy(), **tol)
        if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.LayerNorm, torch.nn.Dropout)):
            index += 1


def test_gradient_through_every_kind_reaches_the_first_layer_as_torchs(torch, rng):
    # δ of the first layer went back through every kind: its db = Σ_rows δ_0 is torch's
    model = torch_model(torch, torch.float64)
    net = cprop.Sequential.from_torch(model)
    X = rng.normal(size=(16, 6))
    model.train()
    model(torch.from_numpy(X)).sum().backward()
    out = net.forward(X, training=True)
    net.backward(np.ones_like(out))
    assert_allclose(net.layers[0].db, model[0].bias.grad.numpy(), rtol=1e-9, atol=1e-11)
    assert_allclose(net.layers[0].dW, model[0].weight.grad.numpy().T, rtol=1e-9, atol=1e-11)


# -- dropout -------------------------------------------------------------------------------------

def test_dropout_masks_scale_and_reuse(rng):
    net = cprop.Sequential([cprop.Dense(50, 400), cprop.Dropout(0.3)], dtype="float64", seed=0)
    X = rng.normal(size=(500, 50))
    clean = net.predict_raw(X)
    assert_array_equal(net.forward(X), clean)              # evaluation: the identity
    out = net.forward(X, training=True, seed=7)
    kept = out != 0
    assert abs(1 - kept.mean() - 0.3) < 0.01              # 200,000 draws
    assert_allclose(out, ref.dropout(clean, kept, 0.3), rtol=1e-12)
    assert_array_equal(net.forward(X, training=True, seed=7), out)   # the seed decides the mask
    assert not np.array_equal(net.forward(X, training=True, seed=8), out)
    net.forward(X, training=True, seed=7)
    G = rng.normal(size=out.shape)
    net.backward(G)
    # backward regenerates the same mask: db = Σ_rows G ⊙ mask / (1 - p)
    assert_allclose(net.layers[0].db, (G * kept / 0.7).sum(axis=0), rtol=1e-10)


def test_dropout_mask_independent_of_thread_count(rng):
    net = cprop.Sequential([cprop.Dense(20, 300), cprop.Dropout(0.5)], dtype="float64", seed=0)
    X = rng.normal(size=(4000, 20))
    one = net.forward(X, training=True, seed=3, n_threads=1)
    two = net.forward(X, training=True, seed=3, n_threads=2)
    assert_array_equal(one == 0, two == 0)
    assert_allclose(one, two, rtol=1e-12)


# -- training -------------------------------------------------------------------------------------

def regularized_net(seed=0, dtype="float32"):
    return cprop.Sequential([cprop.Dense(64, 128), cprop.BatchNorm(128, activation="relu"), cprop.Dropout(0.2),
                             cprop.Dense(128, 64), cprop.LayerNorm(64, activation="gelu"), cprop.Dropout(0.1),
                             cprop.Dense(64, 10)], dtype=dtype, seed=seed)


def digits_split():
    X, y = cprop.datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(X))
    return X[order[:1400]], y[order[:1400]], X[order[1400:]], y[order[1400:]]


def test_batchnorm_and_dropout_train_digits_at_least_as_well():
    X, y, Xt, yt = digits_split()
    scores = {}
    for name, net in (("plain", cprop.Sequential([cprop.Dense(64, 128, "relu"), cprop.Dense(128, 64, "gelu"),
                                                   cprop.Dense(64, 10)], seed=0)),
                      ("regularized", regularized_net())):
        trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.Adam(lr=3e-3), batch_size=64, seed=0)
        trainer.fit(X, y, epochs=25)
        scores[name] = trainer.evaluate(Xt, yt)["accuracy"]
    assert scores["regularized"] >= scores["plain"] - 0.005, scores
    assert scores["regularized"] > 0.95, scores


@pytest.mark.parametrize("n_threads", [1, 2])
def test_fit_with_every_kind_is_reproducible(n_threads):
    X, y, _, _ = digits_split()
    runs = []
    for _ in range(2):
        net = regularized_net(dtype="float64")
        trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.05, momentum=0.9),
                                batch_size=100, seed=5, n_threads=n_threads)
        trainer.fit(X, y, epochs=3)
        runs.append((net.params.copy(), net.buffers.copy()))
    assert_array_equal(runs[0][0], runs[1][0])
    assert_array_equal(runs[0][1], runs[1][1])


def test_one_and_two_threads_train_alike():
    # the same masks and statistics; only the products' shapes (and so rounding) differ
    X, y, _, _ = digits_split()
    params = []
    for n_threads in (1, 2):
        net = regularized_net(dtype="float64")
        cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.05), batch_size=200, seed=5,
                      n_threads=n_threads).fit(X, y, epochs=2)
        params.append(np.concatenate([net.params, net.buffers]))
    assert_allclose(params[1], params[0], rtol=1e-9, atol=1e-11)


def test_resume_is_bit_exact_with_every_kind(tmp_path):
    X, y, _, _ = digits_split()

    def trainer():
        return cprop.Trainer(regularized_net(), loss="cross_entropy", optimizer=cprop.AdamW(lr=1e-3),
                             batch_size=64, seed=9)

    straight = trainer()
    straight.fit(X, y, epochs=4)
    first = trainer()
    first.fit(X, y, epochs=2)
    first.save(tmp_path / "half.npz")
    resumed = cprop.Trainer.load(tmp_path / "half.npz")
    resumed.fit(X, y, epochs=2)
    assert_array_equal(resumed.net.params, straight.net.params)
    assert_array_equal(resumed.net.buffers, straight.net.buffers)


def test_save_and_load_keep_every_kind(tmp_path, rng):
    net = regularized_net(dtype="float64")
    net.forward(rng.normal(size=(50, 64)), training=True)     # running statistics away from (0, 1)
    net.save(tmp_path / "net.npz")
    loaded = cprop.load(tmp_path / "net.npz")
    assert repr(loaded) == repr(net)
    assert_array_equal(loaded.params, net.params)
    assert_array_equal(loaded.buffers, net.buffers)
    X = rng.normal(size=(10, 64))
    assert_array_equal(loaded.predict_raw(X), net.predict_raw(X))


def test_files_of_format_1_still_load(tmp_path, rng):
    import json
    import zipfile
    net = cprop.Sequential([cprop.Dense(3, 4, "tanh"), cprop.Dense(4, 2)], seed=0)
    meta = {"format": "cprop", "version": 1, "kind": "network",
            "architecture": {"sizes": [3, 4, 2], "activations": ["tanh", "identity"], "dtype": "float32"}}
    path = tmp_path / "old.npz"
    np.savez(path, __cprop__=np.frombuffer(json.dumps(meta).encode(), np.uint8), params=net.params)
    loaded = cprop.load(path)
    X = rng.normal(size=(5, 3))
    assert_array_equal(loaded.predict_raw(X), net.predict_raw(X))
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize("bad, words", [
    (lambda: cprop.Dropout(1.0), ["p", "< 1"]),
    (lambda: cprop.Dropout(-0.1), ["p", ">= 0"]),
    (lambda: cprop.BatchNorm(4, momentum=0), ["momentum"]),
    (lambda: cprop.LayerNorm(4, eps=0), ["eps"]),
    (lambda: cprop.Dense(3, 4, "relu", negative_slope=0.2), ["negative_slope", "leaky_relu"]),
    (lambda: cprop.Dense(3, 4, "leaky_relu", negative_slope=-1), ["negative_slope"]),
    (lambda: cprop.Sequential([cprop.Dense(3, 4), cprop.BatchNorm(5)]), ["4", "5"]),
    (lambda: cprop.Sequential([cprop.Dropout(0.5)]), ["Dropout", "width"]),
])
def test_bad_layer_settings_are_refused(bad, words):
    with pytest.raises((ValueError, TypeError)) as info:
        bad()
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_batch_gradient_is_the_training_pass_in_one_call(n_threads, rng):
    # one compiled call = forward(training) + loss + backward with the same dropout masks
    from cprop.losses import loss_code, prepare_targets
    net = regularized_net(dtype="float64")
    X = rng.normal(size=(300, 64))
    y = rng.integers(0, 10, 300)
    T, labels = prepare_targets("cross_entropy", y, 300, 10, np.float64)
    twin = net.copy()
    value = net._batch_gradient(X, T, labels, loss_code("cross_entropy"), seed=11, n_threads=n_threads)
    out = twin.forward(X, training=True, seed=11, n_threads=n_threads)
    loss, grad = cprop.losses.cross_entropy(out, y)
    twin.backward(grad, n_threads=n_threads)
    assert value == pytest.approx(loss, rel=1e-12)
    assert_allclose(net.grads, twin.grads, rtol=1e-10, atol=1e-12)
    assert_allclose(net.buffers, twin.buffers, rtol=1e-12)
