"""Each compiled kernel against the NumPy reference, over float32 and float64."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

import cprop
from cprop._lazy import core as _core  # _core: the build this CPU uses
from cprop._lazy import cpu_has_avx2

import reference as ref
from conftest import ACTIVATIONS, LOSSES, TOLERANCES, activations_of, flat, layers_of, make_net, make_targets

CODES = _core.ACTIVATIONS

# (n_samples, n_in, n_out): a batch of one, odd sizes, sizes around a SIMD width
SHAPES = [(1, 1, 1), (1, 5, 3), (7, 13, 5), (33, 17, 9), (16, 8, 16)]


def one_layer(n_in, n_out, activation, dtype, seed=0):
    return make_net([n_in, n_out], output=activation, dtype=dtype, seed=seed)


# -- dense layer ---------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_forward(shape, activation, dtype, tol, rng):
    n, n_in, n_out = shape
    net = one_layer(n_in, n_out, activation, dtype)
    X = rng.normal(0, 2, (n, n_in))      # wide enough to cover both sides of every kink

    Y = net.forward(X)

    assert Y.dtype == dtype and Y.shape == (n, n_out)
    (W, b), = layers_of(net)
    assert_allclose(Y, ref.dense_forward(X.astype(dtype).astype(np.float64), W, b, activation), **tol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_backward(shape, activation, dtype, tol, rng):
    n, n_in, n_out = shape
    net = one_layer(n_in, n_out, activation, dtype)
    X = rng.normal(0, 2, (n, n_in)).astype(dtype)
    G = rng.normal(size=(n, n_out)).astype(dtype)

    Y = net.forward(X)
    net.backward(G)

    (W, b), = layers_of(net)
    dW, db, dX = ref.dense_backward(X.astype(np.float64), W, Y.astype(np.float64), G, activation)
    layer = net.layers[0]
    assert_allclose(layer.dW, dW, **tol)
    assert_allclose(layer.db, db, **tol)
    # the input gradient, which a first layer never needs, straight from the kernel
    delta = G * ref.DERIVATIVES[activation](Y)
    dX_kernel = np.empty_like(X)
    _core.dense_backward(X, layer.W, delta, np.empty_like(layer.W), np.empty_like(layer.b), dX_kernel, 1)
    assert_allclose(dX_kernel, dX, **tol)


def _elementwise(z, activation):
    """f(z) elementwise through the dense kernel: one row of z times the identity matrix."""
    z = np.ascontiguousarray(z).reshape(1, -1)
    W = np.eye(z.shape[1], dtype=z.dtype)
    Y = np.empty_like(z)
    _core.dense_forward(z, W, np.zeros(z.shape[1], z.dtype), Y, CODES[activation], 1)
    return Y.ravel()


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_sigmoid_tanh_within_a_few_ulp(activation, dtype):
    # cprop evaluates e^x, σ and tanh itself (vectorized); held to a few units in
    # the last place over the whole range: the tanh series near 0, both tails
    # and the switch-over points between the formulas
    z = np.concatenate([np.linspace(-30, 30, 6001), np.geomspace(1e-30, 40, 2000),
                        -np.geomspace(1e-30, 40, 2000), [0.0, 0.125, -0.125, 0.1249999]]).astype(dtype)
    exact = ref.ACTIVATIONS[activation](z.astype(np.longdouble)).astype(np.float64)

    got = _elementwise(z, activation).astype(np.float64)

    eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    normal = np.abs(exact) > 1e3 * tiny      # below that, a clamped tail may differ (still ~0)
    assert_allclose(got[normal], exact[normal], rtol=4 * eps, atol=0)
    assert np.all(np.abs(got[~normal]) <= 1e3 * tiny)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_sigmoid_tanh_keep_nan_and_saturate_at_infinity(activation, dtype):
    # one value per call: through the identity product a NaN would reach every column
    got = np.array([_elementwise(np.array([z], dtype), activation)[0]
                    for z in [np.nan, np.inf, -np.inf, 1e30, -1e30]])

    assert np.isnan(got[0])                  # NaN is never hidden: divergence stays detectable
    low = 0.0 if activation == "sigmoid" else -1.0
    assert_allclose(got[1:], [1.0, low, 1.0, low], atol=np.finfo(dtype).tiny * 1e3, rtol=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_grad_kernel(activation, dtype, tol, rng):
    Y = ref.ACTIVATIONS[activation](rng.normal(0, 2, (6, 11))).astype(dtype)
    G = rng.normal(size=Y.shape).astype(dtype)
    delta = np.empty_like(G)

    _core.activation_grad(G, Y, delta, CODES[activation])

    assert_allclose(delta, G.astype(np.float64) * ref.DERIVATIVES[activation](Y.astype(np.float64)), **tol)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_network_forward_backward(activation, dtype, tol, rng):
    net = make_net([5, 7, 6, 3], hidden=activation, output=activation, dtype=dtype)
    X = rng.normal(0, 2, (9, 5))
    G = rng.normal(size=(9, 3))

    out = net.forward(X)
    net.backward(G)

    layers, acts = layers_of(net), activations_of(net)
    X64 = X.astype(dtype).astype(np.float64)
    outputs = ref.forward(layers, acts, X64)
    assert_allclose(out, outputs[-1], **tol)
    expected = ref.backward(layers, acts, X64, outputs, G.astype(dtype).astype(np.float64))
    for layer, (dW, db) in zip(net.layers, expected):
        assert_allclose(layer.dW, dW, **tol)
        assert_allclose(layer.db, db, **tol)
    # the gradients live in the flat array, laid out like the parameters
    assert_allclose(net.grads, flat(expected), **tol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), n_in=st.integers(1, 24), n_out=st.integers(1, 24),
       activation=st.sampled_from(ACTIVATIONS), seed=st.integers(0, 2**16))
def test_dense_any_shape(n, n_in, n_out, activation, seed):
    rng = np.random.default_rng(seed)
    net = one_layer(n_in, n_out, activation, np.float64, seed=seed)
    X, G = rng.normal(size=(n, n_in)), rng.normal(size=(n, n_out))

    Y = net.forward(X)
    net.backward(G)

    (W, b), = layers_of(net)
    assert_allclose(Y, ref.dense_forward(X, W, b, activation), **TOLERANCES[np.float64])
    dW, db, _ = ref.dense_backward(X, W, Y, G, activation)
    assert_allclose(net.layers[0].dW, dW, **TOLERANCES[np.float64])
    assert_allclose(net.layers[0].db, db, **TOLERANCES[np.float64])


# -- the multi-threaded path ----------------------------------------------------

def test_threads_match_one_thread(dtype, tol, rng):
    # 512×300 -> 200 -> 64 is well above the work a kernel needs before it splits
    # a product between threads
    X = rng.normal(size=(512, 300))
    G = rng.normal(size=(512, 64)) / 512       # the scale of a mean loss's gradient
    results = []
    for n_threads in (1, 2, 2):
        net = make_net([300, 200, 64], hidden="relu", output="tanh", dtype=dtype)
        out = net.forward(X, n_threads=n_threads)
        net.backward(G, n_threads=n_threads)
        results.append((out, net.grads.copy()))

    (out_1, grads_1), (out_2, grads_2), (out_2_again, grads_2_again) = results
    assert_allclose(out_2, out_1, **tol)
    assert_allclose(grads_2, grads_1, **tol)
    # threads split the work in fixed parts, never by timing: repeatable to the bit
    assert_array_equal(out_2_again, out_2)
    assert_array_equal(grads_2_again, grads_2)

    layers, acts = layers_of(net), activations_of(net)
    X64 = X.astype(dtype).astype(np.float64)
    outputs = ref.forward(layers, acts, X64)
    assert_allclose(out_2, outputs[-1], **tol)
    expected = ref.backward(layers, acts, X64, outputs, G.astype(dtype).astype(np.float64))
    assert_allclose(grads_2, flat(expected), **tol)


@pytest.mark.parametrize("sizes, n", [([3, 32, 32, 1], 9), ([64, 1024, 1], 16)], ids=str)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_single_output_backward(sizes, n, n_threads, dtype, tol, rng):
    """A single output's δ·Wᵀ (taken as an NN product over W read as Wᵀ) and the activation
    gradient over whole rows, by rows and (1024 wide, 16 rows, 2 threads) split by columns."""
    net = make_net(sizes, hidden="tanh", output="identity", dtype=dtype)
    X = rng.normal(size=(n, sizes[0]))
    G = rng.normal(size=(n, 1))
    net.forward(X, n_threads=n_threads, training=True)
    net.backward(G, n_threads=n_threads)
    layers, acts = layers_of(net), activations_of(net)
    X64 = X.astype(dtype).astype(np.float64)
    expected = ref.backward(layers, acts, X64, ref.forward(layers, acts, X64), G.astype(dtype).astype(np.float64))
    assert_allclose(net.grads, flat(expected), **tol)


@pytest.mark.parametrize("shape", [(512, 300, 200), (515, 301, 203)], ids=str)
def test_threaded_backward_kernel(shape, dtype, tol, rng):
    n, n_in, n_out = shape
    X = rng.normal(size=(n, n_in)).astype(dtype)
    W = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(dtype)
    delta = (rng.normal(size=(n, n_out)) / n).astype(dtype)
    results = []
    for n_threads in (1, 2):
        dW, db, dX = np.empty_like(W), np.empty(n_out, dtype), np.empty_like(X)
        _core.dense_backward(X, W, delta, dW, db, dX, n_threads)
        results.append((dW, db, dX))

    expected = (X.T.astype(np.float64) @ delta, delta.astype(np.float64).sum(0),
                delta.astype(np.float64) @ W.T)
    for got_1, got_2, want in zip(*results, expected):
        assert_allclose(got_2, got_1, **tol)
        assert_allclose(got_2, want, **tol)


@pytest.mark.parametrize("cls, config", [(cprop.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
                                         (cprop.Adam, {"lr": 0.01, "weight_decay": 1e-3})], ids=str)
def test_threaded_optimizer_step_is_exact(cls, config, dtype, rng):
    # over 2·2¹⁵ parameters the update is split between threads; it is elementwise,
    # so the split cannot change a single bit
    X = rng.normal(size=(8, 300))
    nets = []
    for n_threads in (1, 2):
        net, optimizer = make_net([300, 256], dtype=dtype), cls(**config)
        for _ in range(3):
            net.forward(X)
            net.backward(np.ones((8, 256)))
            optimizer.step(net, n_threads=n_threads)
        nets.append(net)
    assert_array_equal(nets[1].params, nets[0].params)
    assert not np.array_equal(nets[0].params, make_net([300, 256], dtype=dtype).params)


# -- losses ----------------------------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 5), (9, 4), (64, 10)], ids=str)
def test_loss(loss, shape, dtype, tol, rng):
    out = rng.normal(0, 3, shape).astype(dtype)
    y = make_targets(loss, *shape, rng)

    value, grad = getattr(cprop.losses, loss)(out, y)

    expected_value, expected_grad = ref.LOSSES[loss](out.astype(np.float64), y)
    assert isinstance(value, float)
    assert grad.dtype == dtype and grad.shape == shape
    assert value == pytest.approx(expected_value, rel=tol["rtol"], abs=tol["atol"])
    assert_allclose(grad, expected_grad, **tol)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "poisson", "l1", "huber"])
def test_loss_single_output_takes_1d_targets(loss, dtype, rng):
    out = rng.normal(size=(7, 1)).astype(dtype)
    y = make_targets(loss, 7, 1, rng)

    value_2d, grad_2d = getattr(cprop.losses, loss)(out, y)
    value_1d, grad_1d = getattr(cprop.losses, loss)(out, y[:, 0])

    assert value_1d == value_2d
    assert_array_equal(grad_1d, grad_2d)


def test_cross_entropy_large_logits_stay_finite(dtype, tol):
    out = np.array([[1000.0, 0.0, -1000.0], [-800.0, 800.0, 799.0]], dtype=dtype)
    labels = np.array([2, 1])

    value, grad = cprop.losses.cross_entropy(out, labels)

    expected_value, expected_grad = ref.cross_entropy(out.astype(np.float64), labels)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert value == pytest.approx(expected_value, rel=tol["rtol"])   # (2000 + 1 + log(1 + 1/e)) / 2
    assert_allclose(grad, expected_grad, **tol)


def test_poisson_refuses_negative_targets_and_overflows_to_infinity():
    out = np.zeros((3, 2))
    with pytest.raises(ValueError, match="poisson needs targets >= 0"):
        cprop.losses.poisson(out, [[1, 2], [0, -1], [3, 4]])

    value, grad = cprop.losses.poisson(np.array([[800.0, 0.0]]), [[1, 2]])    # e^800 overflows
    assert value == np.inf and grad[0, 0] == np.inf


@pytest.mark.parametrize("loss, intercept", [("l1", 1.0), ("huber", 1.0 + 0.1 / 0.9)])
def test_l1_and_huber_regression_see_past_outliers(loss, intercept):
    """y = 2x + 1 with a tenth of the targets moved up by 50: l1 fits the conditional median
    (slope 2, intercept 1); huber's clipped gradient gives the outliers a pull of 1 each,
    which the inliers' residuals balance at an intercept about 0.1/0.9 higher; mse is
    dragged towards the outliers."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 1))
    y = 2 * X[:, 0] + 1 + 0.1 * rng.normal(size=400)
    y[rng.random(400) < 0.1] += 50

    def fit(loss):
        net = cprop.Sequential([cprop.Dense(1, 1)], dtype=np.float64, seed=0)
        trainer = cprop.Trainer(net, loss, optimizer=cprop.Adam(lr=0.05), batch_size=400, seed=0)
        trainer.fit(X, y, epochs=400, callbacks=[cprop.schedules.ExponentialLR(0.99)])
        return net.layers[0].W[0, 0], net.layers[0].b[0]

    slope, bias = fit(loss)
    assert slope == pytest.approx(2, abs=0.05)
    assert bias == pytest.approx(intercept, abs=0.05)
    assert fit("mse")[1] > intercept + 2


def test_poisson_regression_finds_the_maximum_likelihood_rate():
    """A linear network with the poisson loss is Poisson regression: L-BFGS reaches
    scikit-learn's PoissonRegressor (unpenalised), and predict gives the rate e^out."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    y = rng.poisson(np.exp(X @ [0.5, -0.3, 0.2] + 0.4)).astype(np.float64)
    net = cprop.Sequential([cprop.Dense(3, 1)], dtype=np.float64, seed=0)
    trainer = cprop.Trainer(net, "poisson", optimizer=cprop.LBFGS(tol=1e-10))

    trainer.fit(X, y)

    glm = linear_model.PoissonRegressor(alpha=0, tol=1e-12, max_iter=1000).fit(X, y)
    assert_allclose(net.layers[0].W[:, 0], glm.coef_, rtol=0, atol=1e-5)
    assert_allclose(net.layers[0].b, glm.intercept_, rtol=0, atol=1e-5)
    assert_allclose(trainer.predict(X), glm.predict(X), rtol=1e-4)
    assert trainer.evaluate(X, y).keys() == {"loss"}


def test_binary_cross_entropy_large_logits_stay_finite(dtype, tol):
    out = np.array([[200.0, -200.0], [-200.0, 200.0]], dtype=dtype)
    t = np.array([[1.0, 0.0], [1.0, 0.0]])

    value, grad = cprop.losses.binary_cross_entropy(out, t)

    assert value == pytest.approx(100.0, rel=tol["rtol"])   # two of four terms cost 200, two cost 0
    assert_allclose(grad, [[0, 0], [-0.25, 0.25]], **tol)


# -- optimizers --------------------------------------------------------------------

SGD_CONFIGS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05},
    {"lr": 0.1, "weight_decay": 0.05},
]


def _steps(net, optimizer, n_steps, rng, reference_step):
    """Take n_steps on `net`; after each, hold its parameters against the reference step
    applied to the same gradients."""
    tol = TOLERANCES[net.dtype]
    params = net.params.astype(np.float64)
    for t in range(1, n_steps + 1):
        out = net.forward(rng.normal(size=(6, net.n_inputs)))
        net.backward(cprop.losses.mse(out, rng.normal(size=out.shape))[1])
        grads = net.grads.astype(np.float64)
        optimizer.step(net)
        reference_step([params], [grads], t)
        assert_allclose(net.params, params, **tol)


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_sgd_step(config, dtype, rng):
    net = make_net([4, 5, 3], dtype=dtype)
    velocity = [np.zeros(net.n_params)]

    def reference_step(params, grads, t):
        ref.sgd_step(params, grads, velocity, **config)

    _steps(net, cprop.SGD(**config), 4, rng, reference_step)


@pytest.mark.parametrize("cls, config", [
    (cprop.Adam, {"lr": 0.01}),
    (cprop.Adam, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    (cprop.AdamW, {"lr": 0.01}),
    (cprop.AdamW, {"lr": 0.02, "betas": (0.5, 0.9), "weight_decay": 0.3}),
    # scikit-learn's ε placement; a large ε makes it differ from torch's visibly
    (cprop.Adam, {"lr": 0.01, "sklearn_style": True}),
    (cprop.Adam, {"lr": 0.02, "betas": (0.8, 0.99), "eps": 0.1, "weight_decay": 0.1, "sklearn_style": True}),
], ids=str)
def test_adam_step(cls, config, dtype, rng):
    net = make_net([4, 5, 3], dtype=dtype)
    m, v = [np.zeros(net.n_params)], [np.zeros(net.n_params)]
    optimizer = cls(**config)
    hyper = {"lr": optimizer.lr, "betas": optimizer.betas, "eps": optimizer.eps,
             "weight_decay": optimizer.weight_decay, "decoupled": cls is cprop.AdamW,
             "sklearn_style": optimizer.sklearn_style}

    def reference_step(params, grads, t):
        ref.adam_step(params, grads, m, v, t, **hyper)

    _steps(net, optimizer, 4, rng, reference_step)
    assert optimizer.step_count == 4          # Adam's t, which its bias correction needs


# -- what net.forward accepts ----------------------------------------------------------

def _fortran(X):
    return np.asfortranarray(X)


def _strided(X):
    big = np.zeros((2 * X.shape[0], 3 * X.shape[1]))
    big[::2, ::3] = X
    return big[::2, ::3]


def _read_only(X):
    X = X.copy()
    X.flags.writeable = False
    return X


def _as_list(X):
    return X.tolist()


def _other_float(X):
    return X.astype(np.float32 if X.dtype == np.float64 else np.float64)


@pytest.mark.parametrize("convert", [_fortran, _strided, _read_only, _as_list, _other_float])
def test_forward_accepts_any_layout(convert, dtype, rng):
    net = make_net([5, 7, 3], dtype=dtype)
    X = rng.normal(size=(9, 5)).astype(dtype)
    X_in = convert(X)
    before = np.array(X_in, copy=True)

    out = net.forward(X_in)
    net.backward(np.ones_like(out))

    expected_net = make_net([5, 7, 3], dtype=dtype)
    expected = expected_net.forward(np.ascontiguousarray(X_in, dtype=dtype))
    expected_net.backward(np.ones_like(expected))
    assert_array_equal(out, expected)
    assert_array_equal(net.grads, expected_net.grads)
    assert_array_equal(np.asarray(X_in), before)          # the input is never written to


def test_forward_accepts_integers(dtype, rng):
    net = make_net([5, 7, 3], dtype=dtype)
    X = rng.integers(-3, 4, (9, 5))

    assert_array_equal(net.forward(X), net.forward(X.astype(dtype)))
    assert_array_equal(net.forward(X.tolist()), net.forward(X.astype(dtype)))


def test_predict_raw_equals_forward_across_chunks(dtype, tol, rng):
    # chunks are products of other shapes than forward's one product: BLAS kernels
    # (OpenBLAS's AVX-512 ones in particular) may round them differently
    net = make_net([5, 7, 3], dtype=dtype)
    X = rng.normal(size=(50, 5))

    assert_allclose(net.predict_raw(X, chunk_size=16), net.forward(X), **tol)
    # the same chunking twice makes the same products: that is exact
    assert_array_equal(net.predict_raw(X, chunk_size=16), net.predict_raw(X, chunk_size=16))


def test_predict_raw_default_chunks_equal_forward_on_many_rows(dtype, tol, rng):
    # 9,000 rows: two threads (9 MFLOP), each with more than one default chunk (1,024 rows);
    # chunked products round like one big product only within tolerance (shape-dependent kernels)
    net = make_net([5, 64, 3], dtype=dtype)
    X = rng.normal(size=(9000, 5))

    assert_allclose(net.predict_raw(X, n_threads=2), net.forward(X, n_threads=1), **tol)
    assert_allclose(net.predict_raw(X, n_threads=1), net.forward(X, n_threads=1), **tol)


# -- the two builds of the core ------------------------------------------------------

BUILD_PROBE = """
import json, sys
import numpy as np
import cprop
X, y = cprop.datasets.load_digits()
X = X[:400].astype(np.float64)
out = {"simd": cprop.show_config(file=open("/dev/null", "w"))["simd"]}
for act, opt in [("relu", cprop.SGD(lr=0.05, momentum=0.9)), ("tanh", cprop.Adam(lr=1e-3)),
                 ("sigmoid", cprop.AdamW(lr=1e-3, weight_decay=0.01))]:
    net = cprop.Sequential([cprop.Dense(64, 32, act), cprop.Dense(32, 10)], dtype=np.float64, seed=0)
    cprop.Trainer(net, "cross_entropy", opt, batch_size=32, seed=0).fit(X, y[:400], epochs=3)
    out[act] = net.params.tolist()
print(json.dumps(out))
"""


def _train_with_build(variant, cwd):
    env = dict(os.environ, CPROP_CORE=variant)
    # cwd: not the source tree, whose uncompiled cprop/ would shadow the installed one
    proc = subprocess.run([sys.executable, "-c", BUILD_PROBE], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("cprop._core_avx2") is None or not cpu_has_avx2(),
                    reason="no AVX2 build of the core, or a CPU without AVX2/FMA")
def test_avx2_and_baseline_builds_train_alike(tmp_path):
    # the same source compiled twice: only rounding (FMA contraction) may differ
    baseline, avx2 = _train_with_build("baseline", tmp_path), _train_with_build("avx2", tmp_path)

    assert baseline.pop("simd") == "baseline" and avx2.pop("simd") == "avx2"
    for act in baseline:
        assert_allclose(avx2[act], baseline[act], rtol=1e-8, atol=1e-10, err_msg=act)
