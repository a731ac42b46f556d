"""ONNX export (cprop.onnx): the graph passes onnx's checker and ONNX Runtime computes what cprop
computes, for every activation, both dtypes and both heads; the scikit-learn drop-ins convert
with skl2onnx, alone and in a Pipeline; `cprop export` on the command line.

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

import cprop                      # noqa: E402
import cprop.onnx as cprop_onnx   # noqa: E402
from cprop.__main__ import main   # noqa: E402

from conftest import ACTIVATIONS, make_net   # noqa: E402

# ONNX Runtime's float32 Tanh and Sigmoid are vectorised approximations (within a few float32
# ulps); in float64 only the summation order of the products differs
ORT_TOLERANCE = {np.float32: {"rtol": 1e-5, "atol": 1e-5},
                 np.float64: {"rtol": 1e-12, "atol": 1e-12}}
BATCH_SIZES = [1, 7, 300]


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


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_onnx_runtime_computes_forward_for_every_activation(activation, dtype, tmp_path):
    net = random_net(activation, dtype)
    path = tmp_path / f"{activation}.onnx"
    net.to_onnx(path)
    sess = session(path)
    assert sess.get_inputs()[0].type == ("tensor(float)" if dtype == np.float32 else "tensor(double)")
    rng = np.random.default_rng(1)

    for n in BATCH_SIZES:
        X = (3 * rng.standard_normal((n, 5))).astype(dtype)
        [out] = run(sess, X)
        assert out.dtype == dtype and out.shape == (n, 3)
        assert_allclose(out, net.forward(X), **ORT_TOLERANCE[dtype])


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


def test_leaky_relu_keeps_its_exact_slope_in_float64(tmp_path):
    # LeakyRelu's alpha attribute is a float32 (0.01 + 2e-10): float64 networks use PRelu with a
    # float64 slope, so a negative input of 1e6 comes out as exactly -1e4
    net = cprop.Sequential([cprop.Dense(1, 1, "leaky_relu")], dtype="float64", seed=0)
    net.layers[0].W = [[1.0]]
    sess = session(net.to_onnx(tmp_path / "net.onnx"))

    [out] = run(sess, np.array([[-1e6], [3.0]]))

    assert_array_equal(out, net.forward(np.array([[-1e6], [3.0]])))
    assert_array_equal(out, [[-1e4], [3.0]])


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
            ([tmp_path / "net.npz", tmp_path / "missing" / "x.onnx"], ["missing", "does not exist"], 1)]:
        assert main(["export", *map(str, args)]) == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cprop export: error: ")
        assert all(word in err[0] for word in words), err
    assert not (tmp_path / "x.onnx").exists()
