"""ONNX export (cprop.onnx): the graph passes onnx's checker and ONNX Runtime computes what cprop
computes (predict_raw), for every activation and layer kind, both dtypes, both heads and the
opsets where the operators change; the scikit-learn drop-ins convert with skl2onnx, alone and in
a Pipeline; `cprop export` on the command line.

Skipped without onnx and onnxruntime (pip install "cprop[onnx]"); the drop-in tests also need
skl2onnx.
"""
import json
import os
import re
import sys
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import expit, softmax

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cprop  # noqa: E402
import cprop.onnx as cprop_onnx  # noqa: E402
from cprop.__main__ import main  # noqa: E402

from conftest import make_net  # noqa: E402

# ONNX Runtime's float32 Tanh and Sigmoid are vectorised approximations (within a few float32
# ulps); in float64 only the summation order of the products differs
ORT_TOLERANCE = {np.float32: {"rtol": 1e-5, "atol": 1e-5},
                 np.float64: {"rtol": 1e-12, "atol": 1e-12}}
BATCH_SIZES = [1, 7, 300]
ALL_ACTIVATIONS = cprop.activations.names()
# the lowest opset, the default, and the one from which float32 gelus are Gelu nodes
OPSETS = [cprop_onnx.MIN_OPSET, cprop_onnx.DEFAULT_OPSET, cprop_onnx.GELU_OPSET]


def session(model_or_path):
    """An ONNX Runtime session on the CPU, one thread (the test machine is shared)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(sess, X):
    """Every output of `sess` for X fed to its one input."""
    return sess.run(None, {sess.get_inputs()[0].name: X})


def mentions(*words):
    """A `match=` pattern that finds every one of `words` in the message, in any order."""
    return "(?is)^" + "".join(f"(?=.*{re.escape(w)})" for w in words)


def random_net(activation, dtype, seed=0):
    """5-16-8-3 with `activation` on every layer (the output layer too), N(0, 1) weights: large
    pre-activations, so saturation and the negative side of every activation are exercised."""
    net = cprop.Sequential([cprop.Dense(5, 16, activation), cprop.Dense(16, 8, activation),
                            cprop.Dense(8, 3, activation)], dtype=dtype, seed=seed)
    net.params[...] = np.random.default_rng(seed).standard_normal(net.n_params)
    return net


def op_types(model):
    return {node.op_type for node in model.graph.node}


def assert_runs_like_predict_raw(net, model, n_inputs, scale=3.0, seed=1):
    """ONNX Runtime's output for random inputs (batches of 1, 7 and 300) is predict_raw's.

    The absolute tolerance is scaled by the batch's largest output: sums of products round
    in proportion to their terms, so an output where large terms cancel is only as exact
    as the outputs' scale (OpenBLAS's Prescott kernels and ONNX Runtime's Gemm differ by
    3e-5 on an output of 1.5 in a float32 identity network, otherwise 1e-5 of it)."""
    onnx.checker.check_model(model, full_check=True)
    sess = session(model)
    dtype = np.dtype(net.dtype).type
    assert sess.get_inputs()[0].type == ("tensor(float)" if dtype == np.float32 else "tensor(double)")
    rng = np.random.default_rng(seed)
    for n in BATCH_SIZES:
        X = (scale * rng.standard_normal((n, n_inputs))).astype(dtype)
        [out] = run(sess, X)
        assert out.dtype == dtype and out.shape == (n, net.n_outputs)
        expected = net.predict_raw(X)
        tol = ORT_TOLERANCE[dtype]
        assert_allclose(out, expected, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, np.abs(expected).max()))


# -- the graph -------------------------------------------------------------------------------------

def test_graph_is_valid_onnx_with_named_dynamic_input_and_output(tmp_path):
    net = make_net([4, 6, 3], hidden="relu", dtype=np.float32)

    model = cprop_onnx.export(net, tmp_path / "net.onnx")

    loaded = onnx.load(tmp_path / "net.onnx")
    onnx.checker.check_model(loaded, full_check=True)
    assert loaded.SerializeToString() == model.SerializeToString()
    assert loaded.producer_name == "cprop" and loaded.producer_version == cprop.__version__
    assert [(o.domain, o.version) for o in loaded.opset_import] == [("", cprop_onnx.DEFAULT_OPSET)]
    assert loaded.ir_version == onnx.helper.find_min_ir_version_for(loaded.opset_import)
    [x], [y] = loaded.graph.input, loaded.graph.output
    assert x.name == "X" and y.name == "logits"
    for value, width in ((x, 4), (y, 3)):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "N" and dims[1].dim_value == width
    assert [n.op_type for n in loaded.graph.node] == ["Gemm", "Relu", "Gemm"]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in loaded.graph.initializer}
    for i, layer in enumerate(net.layers):
        assert_array_equal(weights[f"layer{i}.W"], layer.W)
        assert_array_equal(weights[f"layer{i}.b"], layer.b)
    props = {p.key: p.value for p in loaded.metadata_props}
    assert json.loads(props["cprop.architecture"]) == net.architecture()


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_onnx_runtime_computes_forward_for_every_activation(activation, opset, dtype, tmp_path):
    net = random_net(activation, dtype)
    path = tmp_path / f"{activation}.onnx"

    net.to_onnx(path, opset=opset)

    assert_runs_like_predict_raw(net, onnx.load(path), 5)


@pytest.mark.parametrize("head, function", [("softmax", lambda z: softmax(z, axis=1)), ("sigmoid", expit)])
@pytest.mark.parametrize("hidden", ["relu", "tanh"])
def test_heads_turn_logits_into_probabilities(head, function, hidden, dtype, tmp_path):
    net = make_net([6, 10, 7, 4], hidden=hidden, dtype=dtype, seed=3)
    path = tmp_path / "net.onnx"
    model = cprop_onnx.export(net, path, head=head)
    assert [o.name for o in model.graph.output] == ["probabilities"]
    assert model.graph.node[-1].op_type == head.capitalize()
    sess = session(path)
    rng = np.random.default_rng(2)

    for n in BATCH_SIZES:
        X = rng.standard_normal((n, 6)).astype(dtype)
        [proba] = run(sess, X)
        assert_allclose(proba, function(net.forward(X).astype(np.float64)), **ORT_TOLERANCE[dtype])
        if head == "softmax":
            assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("slope", [0.01, 0.2, 0.0, 3.5])
def test_leaky_relu_keeps_its_own_exact_slope(slope, opset, dtype, tmp_path):
    # LeakyRelu's alpha attribute is a float32 (0.01 + 2e-10 for 0.01), exact in float32 networks;
    # float64 networks take the slope as a float64 constant, so a negative input of 1e6 comes out
    # as exactly -1e6 times the double slope
    net = cprop.Sequential([cprop.Dense(1, 1, "leaky_relu", negative_slope=slope)], dtype=dtype, seed=0)
    net.layers[0].W = [[1.0]]
    model = net.to_onnx(tmp_path / "net.onnx", opset=opset)
    X = np.array([[-1e6], [3.0], [-0.5]], dtype=dtype)

    [out] = run(session(model), X)

    assert_array_equal(out, net.predict_raw(X))
    assert_array_equal(out, np.array([[-1e6 * slope], [3.0], [-0.5 * slope]], dtype=dtype))


@pytest.mark.parametrize("opset", [cprop_onnx.MIN_OPSET, cprop_onnx.DEFAULT_OPSET])
def test_opsets_from_the_minimum_run_the_same(opset, tmp_path):
    net = make_net([5, 8, 3], hidden="leaky_relu", dtype=np.float32)
    model = cprop_onnx.export(net, tmp_path / "net.onnx", opset=opset, head="softmax")
    assert model.opset_import[0].version == opset
    X = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)

    [proba] = run(session(model), X)

    assert_allclose(proba, softmax(net.forward(X), axis=1), **ORT_TOLERANCE[np.float32])


def test_standardize_puts_the_input_scaling_in_the_graph(dtype, tmp_path):
    net = make_net([3, 5, 2], hidden="tanh", dtype=dtype)
    mean, std = np.array([10.0, -2.0, 0.5]), np.array([4.0, 0.25, 1.0])
    model = cprop_onnx.export(net, tmp_path / "net.onnx", standardize=(mean, std))
    assert [n.op_type for n in model.graph.node][:2] == ["Sub", "Div"]
    X = (mean + std * np.random.default_rng(0).standard_normal((7, 3))).astype(dtype)

    [out] = run(session(model), X)

    assert_allclose(out, net.forward((X - mean) / std), **ORT_TOLERANCE[dtype])


def test_unstandardize_puts_the_target_scaling_in_the_graph(dtype, tmp_path):
    net = make_net([3, 5, 2], hidden="tanh", dtype=dtype)
    mean, std = np.array([150.0, -3.0]), np.array([70.0, 0.5])
    model = cprop_onnx.export(net, tmp_path / "net.onnx", unstandardize=(mean, std))
    assert [n.op_type for n in model.graph.node][-2:] == ["Mul", "Add"]
    assert model.graph.output[0].name == cprop_onnx.PREDICTIONS
    X = np.random.default_rng(0).standard_normal((7, 3)).astype(dtype)

    [out] = run(session(model), X)

    assert_allclose(out, net.forward(X) * std + mean, **ORT_TOLERANCE[dtype])


def test_trained_digits_model_predicts_the_same_through_onnx_runtime(dtype, tmp_path):
    X, y = cprop.datasets.load_digits()
    X = X.astype(dtype)
    net = cprop.Sequential([cprop.Dense(64, 32, "relu"), cprop.Dense(32, 10)], dtype=dtype, seed=0)
    trainer = cprop.Trainer(net, "cross_entropy", cprop.SGD(lr=0.05, momentum=0.9), batch_size=32, seed=0)
    trainer.fit(X, y, epochs=3)
    assert trainer.evaluate(X, y)["accuracy"] > 0.8   # a model that learned something
    path = tmp_path / "digits.onnx"
    net.to_onnx(path, head="softmax")

    [proba] = run(session(path), X)

    assert_allclose(proba, trainer.predict_proba(X), **ORT_TOLERANCE[dtype])
    assert_array_equal(proba.argmax(axis=1), trainer.predict(X))


# -- the other layer kinds, and the activations' precision ------------------------------------------

def with_random_statistics(net, seed=0):
    """`net` with N(0, 1) parameters and running statistics far from (0, 1): running means
    N(0, 2), running variances in [0.05, 4]."""
    rng = np.random.default_rng(seed)
    net.params[...] = rng.standard_normal(net.n_params)
    for layer in net.layers:
        if isinstance(layer, cprop.BatchNorm):
            layer.running_mean[...] = 2 * rng.standard_normal(layer.n_out)
            layer.running_var[...] = rng.uniform(0.05, 4, layer.n_out)
    return net


LAYER_NETWORKS = {
    "batchnorm": lambda: [cprop.Dense(5, 12), cprop.BatchNorm(12, activation="elu"), cprop.Dense(12, 3)],
    "batchnorm-last": lambda: [cprop.Dense(5, 3, "tanh"), cprop.BatchNorm(3, eps=1e-3)],
    "batchnorm-no-affine": lambda: [cprop.Dense(5, 12), cprop.BatchNorm(12, affine=False, activation="relu"),
                                    cprop.Dense(12, 3)],
    "layernorm": lambda: [cprop.Dense(5, 12), cprop.LayerNorm(12, activation="gelu"), cprop.Dense(12, 3)],
    "layernorm-last": lambda: [cprop.Dense(5, 3, "relu"), cprop.LayerNorm(3, eps=1e-2)],
    "layernorm-no-affine": lambda: [cprop.Dense(5, 12), cprop.LayerNorm(12, elementwise_affine=False,
                                                                         activation="softplus"),
                                    cprop.Dense(12, 3)],
    "dropout": lambda: [cprop.Dense(5, 12, "silu"), cprop.Dropout(0.3), cprop.Dense(12, 3)],
    "dropout-first-and-last": lambda: [cprop.Dropout(0.2), cprop.Dense(5, 3, "gelu_tanh"), cprop.Dropout(0.5)],
    "input-norms": lambda: [cprop.BatchNorm(5, activation="leaky_relu", negative_slope=0.1),
                            cprop.LayerNorm(5, activation="sigmoid"), cprop.Dense(5, 3)],
}


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", LAYER_NETWORKS)
def test_onnx_runtime_computes_predict_raw_for_every_layer_kind(case, opset, dtype, tmp_path):
    net = with_random_statistics(cprop.Sequential(LAYER_NETWORKS[case](), dtype=dtype, seed=0))

    model = net.to_onnx(tmp_path / "net.onnx", opset=opset)

    assert_runs_like_predict_raw(net, onnx.load(tmp_path / "net.onnx"), 5)
    assert "Dropout" not in op_types(model)   # inference: no node at all
    assert model.graph.output[0].name == "logits"
    n_batchnorms = sum(isinstance(layer, cprop.BatchNorm) for layer in net.layers)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == n_batchnorms


def test_dropout_adds_no_node_unless_it_names_the_output(tmp_path):
    plain = make_net([5, 6, 3], hidden="relu")
    with_dropout = cprop.Sequential([cprop.Dropout(0.1), cprop.Dense(5, 6, "relu"), cprop.Dropout(0.5),
                                     cprop.Dense(6, 3)], dtype=np.float64, seed=0)
    with_dropout.params[...] = plain.params
    last = cprop.Sequential([cprop.Dense(5, 3), cprop.Dropout(0.5)], dtype=np.float64, seed=0)

    ops = [n.op_type for n in cprop_onnx.convert(with_dropout).graph.node]

    assert ops == [n.op_type for n in cprop_onnx.convert(plain).graph.node] == ["Gemm", "Relu", "Gemm"]
    assert [n.op_type for n in cprop_onnx.convert(last).graph.node] == ["Gemm", "Identity"]
    X = np.random.default_rng(0).standard_normal((7, 5))
    assert_allclose(run(session(cprop_onnx.convert(with_dropout)), X)[0], plain.predict_raw(X),
                    **ORT_TOLERANCE[np.float64])


@pytest.mark.parametrize("dtype_name, opset, present, absent", [
    # float32: the named operators; Gelu and LayerNormalization from the opsets that have them
    ("float32", 17, {"Elu", "Softplus", "Erf", "Tanh", "LeakyRelu", "BatchNormalization", "LayerNormalization"},
     {"Gelu"}),
    ("float32", 20, {"Gelu", "LayerNormalization"}, {"Erf"}),
    ("float32", 13, {"Erf", "ReduceMean", "Sqrt"}, {"LayerNormalization", "Gelu"}),
    # float64: nothing ONNX Runtime runs in float32 only, nothing with a float32 attribute
    ("float64", 20, {"BatchNormalization", "ReduceMean", "Exp", "MatMul", "Where"},
     {"Elu", "Softplus", "Erf", "Gelu", "LeakyRelu", "PRelu", "LayerNormalization"}),
])
def test_operators_chosen_for_the_dtype_and_opset(dtype_name, opset, present, absent):
    net = cprop.Sequential([cprop.Dense(4, 6, "elu"), cprop.BatchNorm(6, activation="softplus"),
                            cprop.Dense(6, 6, "gelu"), cprop.LayerNorm(6, activation="gelu_tanh"),
                            cprop.Dense(6, 2, "leaky_relu")], dtype=dtype_name, seed=0)

    ops = op_types(cprop_onnx.convert(net, opset=opset))

    assert present <= ops and not absent & ops, ops


def one_unit(activation, dtype):
    """x -> f(x): a 1-1 Dense layer with W = 1, b = 0."""
    net = cprop.Sequential([cprop.Dense(1, 1, activation)], dtype=dtype, seed=0)
    net.layers[0].W = [[1.0]]
    return net


def test_float64_gelu_spells_erf_to_double_precision(tmp_path):
    # ONNX Runtime has no float64 Erf: the graph computes it by quadrature; against libm's erf
    # (cprop's) on a fine grid, through the whole range where erf is not ±1 and beyond
    x = np.concatenate([np.linspace(-12, 12, 24001), [-1e3, -40, 40, 1e3, 1e-300, -1e-300, 0]])[:, None]
    net = one_unit("gelu", np.float64)

    [out] = run(session(net.to_onnx(tmp_path / "gelu.onnx")), x)

    assert_allclose(out, net.predict_raw(x), rtol=1e-14, atol=3e-14)   # erf within 2.5e-15
    assert out[-1, 0] == 0 and out[-4, 0] == 1e3 and out[-7, 0] == 0


@pytest.mark.parametrize("opset", [cprop_onnx.DEFAULT_OPSET, cprop_onnx.GELU_OPSET])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "elu", "softplus", "silu"])
def test_float32_activations_over_their_whole_range(activation, opset, tmp_path):
    x = np.linspace(-30, 30, 6001, dtype=np.float32)[:, None]
    net = one_unit(activation, np.float32)

    [out] = run(session(net.to_onnx(tmp_path / "net.onnx", opset=opset)), x)

    assert_allclose(out, net.predict_raw(x), **ORT_TOLERANCE[np.float32])


def test_softplus_is_x_above_torchs_threshold(dtype, tmp_path):
    net = one_unit("softplus", dtype)
    x = np.array([[20.5], [25.0], [1e4], [20.0], [0.0], [-5.0], [-800.0]], dtype=dtype)

    [out] = run(session(net.to_onnx(tmp_path / "net.onnx")), x)

    assert_array_equal(out[:3], x[:3])
    assert_allclose(out, net.predict_raw(x), **ORT_TOLERANCE[dtype])


def test_float64_epsilons_are_not_rounded_to_float32(tmp_path):
    # ε = 0.1 is 0.1 + 1.5e-9 as a float32 (the type of BatchNormalization's and
    # LayerNormalization's epsilon attributes): with variances near 0 that would move every
    # normalized value by about 7e-9 of itself
    net = cprop.Sequential([cprop.BatchNorm(4, eps=0.1), cprop.LayerNorm(4, eps=0.1)], dtype=np.float64, seed=0)
    net.layers[0].running_mean[...] = [0.0, 1.0, -1.0, 2.0]
    net.layers[0].running_var[...] = [0.0, 1e-3, 2.0, 0.5]
    X = np.random.default_rng(0).standard_normal((9, 4)) * 0.05

    [out] = run(session(net.to_onnx(tmp_path / "net.onnx")), X)

    assert_allclose(out, net.predict_raw(X), rtol=1e-13, atol=1e-13)


def test_trained_network_of_every_kind_predicts_the_same_through_onnx_runtime(dtype, tmp_path):
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((400, 6)) * [1, 3, 0.5, 2, 1, 4] + [0, 5, -1, 0, 2, -3]).astype(dtype)
    y = (X[:, 0] + X[:, 1] / 3 > 1.5).astype(np.int64) + (X[:, 3] > 1)
    net = cprop.Sequential([cprop.Dense(6, 16), cprop.BatchNorm(16, activation="gelu"), cprop.Dropout(0.2),
                            cprop.Dense(16, 12), cprop.LayerNorm(12, activation="silu"), cprop.Dense(12, 3)],
                           dtype=dtype, seed=0)
    trainer = cprop.Trainer(net, "cross_entropy", cprop.Adam(lr=0.01), batch_size=32, seed=0)
    trainer.fit(X, y, epochs=3)
    batchnorm = net.layers[1]
    # the running statistics moved away from (0, 1) (the second input has mean 5, std 3)
    assert np.abs(batchnorm.running_mean).max() > 0.5 and np.abs(batchnorm.running_var - 1).max() > 0.5

    for opset in OPSETS:
        model = cprop_onnx.export(net, tmp_path / "net.onnx", opset=opset, head="softmax")
        onnx.checker.check_model(onnx.load(tmp_path / "net.onnx"), full_check=True)
        [proba] = run(session(model), X)
        assert_allclose(proba, trainer.predict_proba(X), **ORT_TOLERANCE[dtype])
        assert_array_equal(proba.argmax(axis=1), trainer.predict(X))
        assert_runs_like_predict_raw(net, cprop_onnx.convert(net, opset=opset), 6)


# -- what export refuses, and how it writes -------------------------------------------------------

def test_an_activation_without_onnx_form_is_refused_by_name(tmp_path, monkeypatch):
    net = make_net([3, 4, 2])
    # as for a future activation the exporter does not know yet
    monkeypatch.delitem(cprop_onnx.ACTIVATIONS, net.layers[0].activation)

    with pytest.raises(ValueError, match=mentions("layer 0", net.layers[0].activation, "tanh")):
        cprop_onnx.export(net, tmp_path / "net.onnx")
    assert not (tmp_path / "net.onnx").exists()


def test_an_unknown_layer_kind_is_refused_by_name(tmp_path):
    class Scaled(cprop.Dense):
        pass

    net = cprop.Sequential([cprop.Dense(3, 4, "relu"), Scaled(4, 2)], seed=0)

    with pytest.raises(ValueError, match=mentions("layer 1", "Scaled", "Dense")):
        cprop_onnx.export(net, tmp_path / "net.onnx")


@pytest.mark.parametrize("kwargs, words", [
    ({"head": "relu"}, ["head", "softmax", "relu"]),
    ({"opset": 12}, ["opset", "13", "12"]),
    ({"opset": 10 ** 4}, ["opset", "10000"]),
    ({"opset": True}, ["opset", "True"]),
    ({"opset": "17"}, ["opset", "'17'"]),
    ({"standardize": (np.zeros(2), np.ones(3))}, ["mean", "3"]),
    ({"standardize": (np.zeros(3), np.array([1.0, 0.0, 1.0]))}, ["std", "> 0"]),
    ({"standardize": (np.zeros(3), np.array([1.0, np.nan, 1.0]))}, ["std", "finite"]),
    ({"standardize": "mean"}, ["standardize", "(mean, std)"]),
    ({"unstandardize": (np.zeros(3), np.ones(3))}, ["unstandardize", "mean", "2 finite"]),
    ({"unstandardize": (np.zeros(2), np.ones(2)), "head": "softmax"}, ["unstandardize", "softmax"]),
])
def test_bad_arguments_are_refused(kwargs, words, tmp_path):
    net = make_net([3, 4, 2])
    with pytest.raises(ValueError, match=mentions(*words)):
        cprop_onnx.export(net, tmp_path / "net.onnx", **kwargs)
    assert os.listdir(tmp_path) == []


def test_not_a_network_and_non_finite_weights_are_refused(tmp_path):
    with pytest.raises(TypeError, match=mentions("cprop.Sequential", "Dense")):
        cprop_onnx.export(cprop.Dense(3, 2), tmp_path / "net.onnx")
    net = make_net([3, 4, 2])
    net.params[5] = np.nan
    with pytest.raises(ValueError, match=mentions("NaN")):
        net.to_onnx(tmp_path / "net.onnx")


@pytest.mark.parametrize("damage, words", [
    (lambda bn: bn.running_mean.__setitem__(1, np.inf), ["running statistics", "infinite"]),
    (lambda bn: bn.running_var.__setitem__(0, np.nan), ["running statistics", "NaN"]),
    (lambda bn: bn.running_var.__setitem__(2, -0.5), ["layer 1", "BatchNorm", "negative running variance"]),
])
def test_bad_running_statistics_are_refused(damage, words, tmp_path):
    net = cprop.Sequential([cprop.Dense(3, 4), cprop.BatchNorm(4), cprop.Dense(4, 2)], seed=0)
    damage(net.layers[1])

    with pytest.raises(ValueError, match=mentions(*words)):
        net.to_onnx(tmp_path / "net.onnx")
    assert os.listdir(tmp_path) == []


def test_export_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "net.onnx"
    path.write_bytes(b"previous model")
    net = make_net([3, 4, 2])

    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        net.to_onnx(path)
    assert path.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["net.onnx"]   # no temporary file left behind

    monkeypatch.undo()
    net.to_onnx(path)
    assert os.listdir(tmp_path) == ["net.onnx"]
    assert onnx.load(path).producer_name == "cprop"
    with pytest.raises(FileNotFoundError, match=mentions("no_such_dir", "does not exist")):
        net.to_onnx(tmp_path / "no_such_dir" / "net.onnx")


def test_without_onnx_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)   # `import onnx` now raises ImportError

    with pytest.raises(ImportError, match=re.escape('pip install "cprop[onnx]"')):
        make_net([3, 4, 2]).to_onnx(tmp_path / "net.onnx")


# -- the scikit-learn drop-ins through skl2onnx ----------------------------------------------------

@pytest.fixture(scope="module")
def skl2onnx():
    skl2onnx = pytest.importorskip("skl2onnx")
    assert cprop_onnx.SKL2ONNX_REGISTERED
    return skl2onnx


def fitted(estimator, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # ConvergenceWarning: a short fit is all these tests need
        return estimator.fit(X, y)


def converted(skl2onnx, model, X, options=None):
    """ONNX Runtime's outputs (by name) for X through skl2onnx's conversion of `model` with
    skl2onnx's `options` ({estimator or its id: {option: value}})."""
    onx = skl2onnx.to_onnx(model, X[:1], options=options)
    onnx.checker.check_model(onx)
    sess = session(onx)
    return dict(zip([o.name for o in sess.get_outputs()], run(sess, X)))


def classification_data(kind, n=240, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5)) * [1, 2, 0.5, 1, 3] + [0, 1, 0, -2, 5]
    three = np.digitize(X[:, 0] + X[:, 2], [-0.5, 0.5])
    y = {"binary": (X[:, 0] > 0).astype(np.int64),
         "binary_strings": np.where(X[:, 0] > 0, "spam", "ham"),
         "multiclass": 10 * three + 3,
         "multiclass_strings": np.array(["cat", "dog", "emu"])[three],
         "float_labels": three.astype(np.float64),
         "multilabel": np.column_stack([X[:, 0] > 0, X[:, 1] > 1, X[:, 3] > -2]).astype(np.int64)}[kind]
    return X, y


CLASSIFICATIONS = ["binary", "binary_strings", "multiclass", "multiclass_strings", "float_labels", "multilabel"]


@pytest.mark.parametrize("kind", CLASSIFICATIONS)
@pytest.mark.parametrize("in_pipeline", [False, True], ids=["alone", "pipeline"])
def test_classifier_converts_with_labels_and_probabilities(skl2onnx, kind, in_pipeline, dtype):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cprop.sklearn import MLPClassifier
    X, y = classification_data(kind)
    X = X.astype(dtype)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0)
    model = make_pipeline(StandardScaler(), clf) if in_pipeline else clf
    fitted(model, X, y)

    out = converted(skl2onnx, model, X, {id(clf): {"zipmap": False}})

    assert list(out) == ["label", "probabilities"]
    expected = model.predict(X)
    assert out["label"].shape == expected.shape
    assert_array_equal(out["label"], expected.astype(out["label"].dtype))
    assert len(np.unique(expected)) > 1   # both outcomes of the decision are exercised
    assert out["probabilities"].dtype == dtype
    # float32: the pipeline's scaler rounds differently in ONNX Runtime than in numpy
    assert_allclose(out["probabilities"], model.predict_proba(X), **ORT_TOLERANCE[dtype])


def test_classifier_converts_with_skl2onnx_defaults_zipmap_and_nocl(skl2onnx):
    from cprop.sklearn import MLPClassifier
    X, y = classification_data("multiclass_strings")
    X = X.astype(np.float32)
    clf = fitted(MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0), X, y)
    proba = clf.predict_proba(X)

    out = converted(skl2onnx, clf, X)   # skl2onnx's default: probabilities as a list of dicts

    assert_array_equal(out["output_label"], clf.predict(X))
    as_array = np.array([[row[c] for c in clf.classes_] for row in out["output_probability"]])
    assert_allclose(as_array, proba, **ORT_TOLERANCE[np.float32])

    out = converted(skl2onnx, clf, X, {id(clf): {"zipmap": False, "nocl": True}})   # class indices for labels

    assert_array_equal(out["label"], np.searchsorted(clf.classes_, clf.predict(X)))
    assert_allclose(out["probabilities"], proba, **ORT_TOLERANCE[np.float32])


@pytest.mark.parametrize("network_dtype, input_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                                        (np.float64, np.int64)])
def test_input_of_another_dtype_is_cast_to_the_networks(skl2onnx, network_dtype, input_dtype):
    from cprop.sklearn import MLPClassifier
    X, y = classification_data("multiclass")
    clf = fitted(MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0),
                 X.astype(network_dtype), y)
    assert clf.coefs_[0].dtype == network_dtype
    X = np.round(X).astype(input_dtype)

    out = converted(skl2onnx, clf, X, {id(clf): {"zipmap": False}})

    assert out["probabilities"].dtype == (np.float64 if input_dtype == np.float64 else np.float32)
    assert_array_equal(out["label"], clf.predict(X))
    assert_allclose(out["probabilities"], clf.predict_proba(X), **ORT_TOLERANCE[np.float32])


@pytest.mark.parametrize("n_targets", [1, 2])
@pytest.mark.parametrize("in_pipeline", [False, True], ids=["alone", "pipeline"])
def test_regressor_converts_with_its_values(skl2onnx, n_targets, in_pipeline, dtype):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cprop.sklearn import MLPRegressor
    X, _ = classification_data("binary")
    X = X.astype(dtype)
    y = np.column_stack([X[:, 0] * X[:, 1], np.sin(X[:, 2])])[:, :n_targets].squeeze()
    reg = MLPRegressor(hidden_layer_sizes=(16,), activation="tanh", max_iter=30, random_state=0)
    model = fitted(make_pipeline(StandardScaler(), reg) if in_pipeline else reg, X, y)

    out = converted(skl2onnx, model, X)

    assert list(out) == ["variable"]
    assert out["variable"].shape == (len(X), n_targets) and out["variable"].dtype == dtype
    assert_allclose(out["variable"], model.predict(X).reshape(len(X), n_targets), **ORT_TOLERANCE[dtype])


@pytest.mark.parametrize("n_targets", [1, 2])
def test_poisson_regressor_converts_with_its_rates(skl2onnx, n_targets, dtype):
    from cprop.sklearn import MLPRegressor
    X, _ = classification_data("binary")
    X = X.astype(dtype)
    rates = np.exp(np.column_stack([0.5 * X[:, 0], 0.3 * X[:, 1] - 0.2]))[:, :n_targets]
    y = np.random.default_rng(0).poisson(rates).astype(dtype).squeeze()
    reg = fitted(MLPRegressor(loss="poisson", hidden_layer_sizes=(8,), max_iter=30, random_state=0), X, y)

    out = converted(skl2onnx, reg, X)

    assert reg.out_activation_ == "exp" and (out["variable"] > 0).all()
    assert_allclose(out["variable"], reg.predict(X).reshape(len(X), n_targets), **ORT_TOLERANCE[dtype])


def test_weights_assigned_to_coefs_are_the_ones_converted(skl2onnx):
    from cprop.sklearn import MLPRegressor
    X, _ = classification_data("binary")
    reg = fitted(MLPRegressor(hidden_layer_sizes=(4,), max_iter=5, random_state=0), X, X[:, 0])
    reg.coefs_ = [np.ones_like(c) for c in reg.coefs_]   # a new list: adopted at conversion

    out = converted(skl2onnx, reg, X)

    assert_allclose(out["variable"].ravel(), reg.predict(X), rtol=1e-12)
    assert_allclose(reg.predict(X), np.maximum(X.sum(axis=1, keepdims=True) + reg.intercepts_[0], 0).sum(axis=1)
                    + reg.intercepts_[1], rtol=1e-12)


# -- the command line ------------------------------------------------------------------------------

def test_cli_export_of_a_trained_model_takes_raw_features(tmp_path, capsys):
    X, digit = cprop.datasets.load_digits(scale=False)
    X, digit = X[:300], digit[:300]
    header = ",".join(["digit"] + [f"px{i}" for i in range(64)])
    np.savetxt(tmp_path / "digits.csv", np.column_stack([100 + digit, X]), delimiter=",", header=header,
               comments="", fmt="%d")
    assert main(["train", str(tmp_path / "digits.csv"), "--target", "digit", "--epochs", "3", "--quiet",
                 "--out", str(tmp_path / "model.npz")]) == 0
    capsys.readouterr()

    assert main(["export", str(tmp_path / "model.npz"), str(tmp_path / "model.onnx"), "--head", "softmax"]) == 0

    out = capsys.readouterr().out
    assert "model.onnx" in out and "(N, 64) float32" in out and "probabilities (N, 10)" in out
    assert "standardises" in out and "classes 100 101 102" in out
    trainer = cprop.Trainer.load(tmp_path / "model.npz")
    extra = trainer.extra
    [proba] = run(session(tmp_path / "model.onnx"), X)   # raw pixel counts, as `cprop predict` reads
    assert_allclose(proba, trainer.predict_proba((X - np.array(extra["mean"])) / np.array(extra["std"])),
                    rtol=1e-4, atol=1e-5)
    assert main(["predict", str(tmp_path / "model.npz"), str(tmp_path / "digits.csv"), "--target", "digit",
                 "--out", str(tmp_path / "pred.txt")]) == 0
    predicted = np.loadtxt(tmp_path / "pred.txt", dtype=np.int64)
    assert_array_equal(np.array(extra["classes"])[proba.argmax(axis=1)], predicted)


def test_cli_export_of_a_regression_model_answers_in_the_targets_units(tmp_path, capsys):
    from sklearn.datasets import load_diabetes
    X, y = load_diabetes(return_X_y=True)
    X, y = X[:200], y[:200]
    header = ",".join([f"x{i}" for i in range(X.shape[1])] + ["y"])
    np.savetxt(tmp_path / "diab.csv", np.column_stack([X, y]), delimiter=",", header=header, comments="")
    assert main(["train", str(tmp_path / "diab.csv"), "--target", "y", "--epochs", "3", "--quiet",
                 "--out", str(tmp_path / "model.npz")]) == 0
    capsys.readouterr()

    assert main(["export", str(tmp_path / "model.npz"), str(tmp_path / "model.onnx")]) == 0

    out = capsys.readouterr().out
    assert "predictions (N, 1)" in out and "target's own units" in out
    [pred] = run(session(tmp_path / "model.onnx"), X.astype(np.float32))
    assert main(["predict", str(tmp_path / "model.npz"), str(tmp_path / "diab.csv"), "--target", "y",
                 "--out", str(tmp_path / "pred.txt")]) == 0
    assert_allclose(pred.ravel(), np.loadtxt(tmp_path / "pred.txt"), rtol=1e-4, atol=1e-3 * y.std())
    # a head that does not fit the loss is refused, not exported
    for head in ("softmax", "sigmoid"):
        assert main(["export", str(tmp_path / "model.npz"), str(tmp_path / "x.onnx"), "--head", head]) == 2
        err = capsys.readouterr().err
        assert f"--head {head}" in err and "mse" in err and "no head" in err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_of_a_saved_network_and_its_errors(tmp_path, capsys):
    net = make_net([4, 5, 2], hidden="sigmoid", dtype=np.float64)
    net.save(tmp_path / "net.npz")

    assert main(["export", str(tmp_path / "net.npz"), str(tmp_path / "net.onnx"), "--opset", "13"]) == 0

    assert "logits (N, 2)" in capsys.readouterr().out
    X = np.random.default_rng(0).standard_normal((7, 4))
    [out] = run(session(tmp_path / "net.onnx"), X)
    assert_allclose(out, net.forward(X), **ORT_TOLERANCE[np.float64])

    (tmp_path / "notes.txt").write_text("not a model")
    for args, words, status in [
            ([tmp_path / "notes.txt", tmp_path / "x.onnx"], ["notes.txt", "not a cprop file"], 1),
            ([tmp_path / "net.npz", tmp_path / "x.onnx", "--opset", "3"], ["opset", "13"], 2),
            ([tmp_path / "net.npz", tmp_path / "missing" / "x.onnx"], ["missing", "does not exist"], 1),
            # a file that cannot be written is the run's failure (1), not the command line's
            *([([tmp_path / "net.npz", "/dev/full"], ["/dev/full"], 1)] if os.path.exists("/dev/full") else [])]:
        assert main(["export", *map(str, args)]) == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cprop export: error: ")
        assert all(word in err[0] for word in words), err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export_help_names_the_default_opset(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert f"(default {cprop_onnx.DEFAULT_OPSET}," in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("mean, std", [(1e308, 1.0), (0.0, 1e-308), (0.0, 1e300)])
def test_a_scaling_the_graphs_dtype_cannot_hold_is_refused(mean, std, tmp_path):
    net = cprop.Sequential([cprop.Dense(2, 1)], seed=0)      # float32 constants
    with pytest.raises(ValueError, match="normal range"):
        cprop_onnx.export(net, tmp_path / "m.onnx", standardize=([mean, 0.0], [std, 1.0]))
    assert not (tmp_path / "m.onnx").exists()
