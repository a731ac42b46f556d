"""ONNX export: a cprop network as a standard ONNX graph, for ONNX Runtime and every other deployer.

Each Dense layer becomes a ``Gemm`` node (``X·W + b``, with W and b stored as
initializers) followed by its activation's node; the graph takes ``X`` of shape
(N, n_inputs), N dynamic, in the network's dtype (float32 or float64) and
returns the raw output ``logits``, or ``probabilities`` when a softmax or
sigmoid head is appended::

    net.to_onnx("model.onnx", head="softmax")      # or cprop.onnx.export(net, ...)

    import onnxruntime
    session = onnxruntime.InferenceSession("model.onnx")
    proba = session.run(None, {"X": X.astype(np.float32)})[0]

Importing this module also registers converters with skl2onnx (when it is
installed) for the scikit-learn drop-ins :class:`cprop.sklearn.MLPClassifier`
and :class:`cprop.sklearn.MLPRegressor`, so ``skl2onnx.to_onnx(clf, X[:1])``
converts them, alone or inside a Pipeline, with skl2onnx's usual outputs: for
a classifier the labels, then the probabilities (a ZipMap by default, a tensor
with the option ``zipmap=False``); for a regressor ``variable``.

Needs ``pip install "cprop[onnx]"`` (onnx, onnxruntime, skl2onnx).
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .layers import Dense
from .network import Sequential

__all__ = ["export", "convert", "DEFAULT_OPSET", "MIN_OPSET"]

# Opset 17 (ONNX 1.12, 2022) is run by every ONNX Runtime since 1.13; the graph
# needs nothing newer. From 13 on, Softmax normalises over the one axis given.
DEFAULT_OPSET = 17
MIN_OPSET = 13
INPUT = "X"
LOGITS = "logits"
PROBABILITIES = "probabilities"


def _require_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError('ONNX export needs the onnx package: pip install "cprop[onnx]"') from exc
    return onnx


# -- node builders -------------------------------------------------------------------------------
# Each takes a graph (_Graph or _Skl2onnxGraph), the name of its input value, the
# network's dtype and node()'s keywords (out: the name to give the result, hint: a
# readable name otherwise), and returns the name of its output.

def _unary(op_type, **attrs):
    """Builder of a one-input node: Relu, Sigmoid, Softmax, ..."""
    return lambda graph, x, dtype, **kw: graph.node(op_type, [x], **attrs, **kw)


def _leaky_relu(graph, x, dtype, **kw):
    """cprop's leaky_relu has slope 0.01 (src/_activations.pxd). LeakyRelu's alpha is a float32
    attribute, exact for float32 networks only; a float64 network gets PRelu, whose slope is a
    tensor of its own dtype (0.01 as a float32 differs from the double 0.01 by 2e-8)."""
    if np.dtype(dtype) == np.float32:
        return graph.node("LeakyRelu", [x], alpha=0.01, **kw)
    slope = graph.constant("leaky_relu.slope", np.full(1, 0.01, dtype=dtype))
    return graph.node("PRelu", [x, slope], **kw)


# cprop activation name -> builder; None: nothing to add
ACTIVATIONS = {
    "identity": None,
    "relu": _unary("Relu"),
    "leaky_relu": _leaky_relu,
    "sigmoid": _unary("Sigmoid"),
    "tanh": _unary("Tanh"),
}

# head name -> builder of the probabilities from the logits
HEADS = {
    "softmax": _unary("Softmax", axis=-1),
    "sigmoid": _unary("Sigmoid"),
}


def _dense(graph, layer, i, x, out):
    """Y = f(X·W + b): a Gemm, then the activation's node (none for identity)."""
    if layer.activation not in ACTIVATIONS:
        raise ValueError(f"cannot export layer {i} ({layer!r}) to ONNX: no ONNX form for activation "
                         f"{layer.activation!r}; cprop.onnx knows {sorted(ACTIVATIONS)}")
    activation = ACTIVATIONS[layer.activation]
    W = graph.constant(f"layer{i}.W", layer.W)
    b = graph.constant(f"layer{i}.b", layer.b)
    y = graph.node("Gemm", [x, W, b], out=out if activation is None else None, hint=f"layer{i}.linear")
    if activation is not None:
        y = activation(graph, y, layer.W.dtype, out=out, hint=f"layer{i}.{layer.activation}")
    return y


# layer kind -> builder(graph, layer, index, input name, output name or None) -> output name
LAYERS = {Dense: _dense}


def _network_nodes(graph, net, x, out=None):
    """Add `net`'s layers to `graph`, reading the value named `x`; returns the output's name
    (`out` when given)."""
    last = len(net.layers) - 1
    for i, layer in enumerate(net.layers):
        build = LAYERS.get(type(layer))
        if build is None:
            raise ValueError(f"cannot export layer {i} (a {type(layer).__name__}) to ONNX: cprop.onnx "
                             f"knows layers of kind {sorted(kind.__name__ for kind in LAYERS)}")
        x = build(graph, layer, i, x, out if i == last else None)
    return x


class _Graph:
    """The nodes and initializers of a standalone graph, with unique readable names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes, self.initializers, self._names = [], [], set()

    def fresh(self, hint):
        name, k = hint, 1
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def constant(self, hint, array):
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op_type, inputs, out=None, hint=None, **attrs):
        out = out if out is not None else self.fresh(hint or op_type)
        self._names.add(out)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=f"{out}.{op_type}",
                                                     **attrs))
        return out


def _check_net(net):
    if not isinstance(net, Sequential):
        raise TypeError(f"ONNX export needs a cprop.Sequential, got {type(net).__name__}")
    if not np.isfinite(net.params).all():
        raise ValueError("the network's parameters contain NaN or infinite values; refusing to export them")


def convert(net: Sequential, *, head: str | None = None, opset: int | None = None,
            standardize: tuple | None = None):
    """The ONNX model (an ``onnx.ModelProto``) of `net`; see :func:`export`, which writes it."""
    onnx = _require_onnx()
    helper = onnx.helper
    _check_net(net)
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be None or one of {sorted(HEADS)}, got {head!r}")
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        opset = DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {newest} (this onnx's newest), "
                         f"got {opset!r}")
    dtype = np.dtype(net.dtype)
    graph = _Graph(onnx)
    x = INPUT
    if standardize is not None:
        mean, std = _check_standardize(standardize, net)
        x = graph.node("Sub", [x, graph.constant("input.mean", mean.astype(dtype))], hint="input.centred")
        x = graph.node("Div", [x, graph.constant("input.std", std.astype(dtype))], hint="input.standardised")
    logits = _network_nodes(graph, net, x, out=LOGITS)
    output = LOGITS
    if head is not None:
        output = HEADS[head](graph, logits, dtype, out=PROBABILITIES)
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    onnx_graph = helper.make_graph(
        graph.nodes, "cprop.Sequential",
        [helper.make_tensor_value_info(INPUT, elem, ["N", net.n_inputs])],
        [helper.make_tensor_value_info(output, elem, ["N", net.n_outputs])],
        graph.initializers)
    from . import __version__
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="cprop", producer_version=__version__,
                              doc_string=f"{'-'.join(map(str, net.sizes))} network exported by cprop")
    # the oldest file format that holds this opset: readable by the most runtimes
    model.ir_version = helper.find_min_ir_version_for(model.opset_import)
    helper.set_model_props(model, {"cprop.architecture": json.dumps(net.architecture()),
                                   "cprop.head": head or "none"})
    onnx.checker.check_model(model)
    return model


def _check_standardize(standardize, net):
    """(mean, std) as float64 arrays of the network's input width, std > 0, all finite."""
    try:
        mean, std = (np.asarray(a, dtype=np.float64) for a in standardize)
    except (TypeError, ValueError):
        raise ValueError("standardize must be a (mean, std) pair of arrays") from None
    for name, arr in (("mean", mean), ("std", std)):
        if arr.shape != (net.n_inputs,) or not np.isfinite(arr).all():
            raise ValueError(f"standardize: {name} must hold {net.n_inputs} finite values, got shape {arr.shape}")
    if (std <= 0).any():
        raise ValueError("standardize: every std must be > 0")
    return mean, std


def export(net: Sequential, path: str | os.PathLike, *, head: str | None = None,
           opset: int | None = None, standardize: tuple | None = None):
    """Write `net` to `path` as an ONNX model; returns the ``onnx.ModelProto``.

    Parameters
    ----------
    net : Sequential
    path : str or os.PathLike
        Written atomically (a temporary file in the same directory, renamed over
        `path`), so a failed export never leaves a half-written file.
    head : {None, "softmax", "sigmoid"}
        None: the graph's output is the raw output, named ``logits``. "softmax"
        (over the last axis) or "sigmoid": the output is that of the logits,
        named ``probabilities``.
    opset : int, optional
        ONNX opset version, from :data:`MIN_OPSET` (13) to the installed onnx's
        newest; default :data:`DEFAULT_OPSET` (17), which ONNX Runtime runs
        from version 1.13 on.
    standardize : (mean, std), optional
        Arrays of n_inputs values: the graph then computes ``(X - mean) / std``
        before the first layer (what ``cprop train`` models expect).

    The graph's input is ``X``, shape (N, n_inputs) with N dynamic, in the
    network's dtype; each Dense layer is a Gemm node with W and b as
    initializers followed by Relu, LeakyRelu (alpha 0.01; PRelu with a float64
    slope in float64 networks), Sigmoid or Tanh (nothing for identity). A layer
    or activation without an ONNX form raises ValueError.
    """
    model = convert(net, head=head, opset=opset, standardize=standardize)
    if model.ByteSize() >= 2 ** 31:
        raise ValueError("the network is too large for a single ONNX file (protobuf's 2 GB limit)")
    _write_atomically(path, model.SerializeToString())
    return model


def _write_atomically(path, data):
    """`data` to `path` through a temporary file in the same directory, flushed, then renamed
    over `path` (as cprop.io saves): an interrupted write leaves any previous file intact."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path!r}: directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".cprop-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- skl2onnx converters for the scikit-learn drop-ins -------------------------------------------

class _Skl2onnxGraph:
    """The builders' graph interface over skl2onnx's scope (names) and container (nodes)."""

    def __init__(self, scope, container):
        self.scope, self.container = scope, container

    def constant(self, hint, array):
        from onnx import TensorProto, numpy_helper
        name = self.scope.get_unique_variable_name(hint)
        array = np.asarray(array)
        if array.dtype.kind in "OUS":
            self.container.add_initializer(name, TensorProto.STRING, list(array.shape),
                                           [str(s).encode("utf-8") for s in array.ravel()])
        else:
            tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
            self.container.add_initializer(name, tensor.data_type, list(array.shape), tensor)
        return name

    def node(self, op_type, inputs, out=None, hint=None, **attrs):
        out = out if out is not None else self.scope.get_unique_variable_name(hint or op_type)
        self.container.add_node(op_type, inputs, out, name=self.scope.get_unique_operator_name(op_type),
                                **attrs)
        return out

    def cast(self, x, from_type, to_type, out=None):
        """x as `to_type` (an onnx TensorProto type), through a Cast node only when needed."""
        if from_type == to_type:
            return self.node("Identity", [x], out=out) if out is not None else x
        return self.node("Cast", [x], out=out, hint="cast", to=to_type)


def _tensor_type(variable):
    from skl2onnx.common.data_types import guess_proto_type
    return guess_proto_type(variable.type)


def _output_float_type(input_variable):
    """skl2onnx's convention: double in, double out; float for everything else."""
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
    return DoubleTensorType if isinstance(input_variable.type, DoubleTensorType) else FloatTensorType


def _class_labels(classes):
    """classes_ as ONNX label values: int64 for integer, boolean and integral float labels
    (skl2onnx's convention), strings for text; anything else is refused."""
    classes = np.asarray(classes)
    if classes.dtype.kind in "biu":
        return classes.astype(np.int64)
    if classes.dtype.kind == "f" and np.all(np.isfinite(classes)) and np.all(classes == np.round(classes)):
        return classes.astype(np.int64)
    if classes.dtype.kind in "US" or (classes.dtype.kind == "O" and all(isinstance(c, str) for c in classes)):
        return classes.astype(str)
    raise ValueError(f"ONNX class labels must be integers or strings; classes_ is {classes!r}")


def _labels_of(operator):
    """The label values the converted classifier outputs: classes_, or their indices with
    skl2onnx's option nocl=True."""
    from skl2onnx.common.utils_classifier import get_label_classes
    return _class_labels(get_label_classes(operator.scope_inst, operator.raw_operator))


def _is_multilabel(model):
    return model._label_binarizer.y_type_.startswith("multilabel")


def _classifier_shapes(operator):
    """Output types: label (N,) int64 or string ((N, n_labels) for multi-label) and
    probabilities (N, n_classes), float or double like the input."""
    from skl2onnx.common.data_types import Int64TensorType, StringTensorType
    from skl2onnx.common.utils import check_input_and_output_numbers
    check_input_and_output_numbers(operator, input_count_range=1, output_count_range=2)
    model = operator.raw_operator
    n = operator.inputs[0].get_first_dimension()
    labels = _labels_of(operator)
    label_type = StringTensorType if labels.dtype.kind == "U" else Int64TensorType
    operator.outputs[0].set_type(label_type([n, len(labels)] if _is_multilabel(model) else [n]))
    operator.outputs[1].set_type(_output_float_type(operator.inputs[0])([n, len(labels)]))


def _network_of(operator, graph):
    """The drop-in's network applied to the operator's input (cast to the network's dtype);
    returns the logits' name, the network and its ONNX element type."""
    from onnx import helper
    net = operator.raw_operator._network()
    _check_net(net)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(net.dtype))
    x = graph.cast(operator.inputs[0].full_name, _tensor_type(operator.inputs[0]), elem)
    return _network_nodes(graph, net, x), net, elem


def _convert_classifier(scope, operator, container):
    """Labels and probabilities as the drop-in's predict and predict_proba compute them:
    softmax over the logits (multi-class), or sigmoid p giving (1 - p, p) (binary) or one
    probability per label (multi-label); labels from the logits' argmax or sign."""
    from onnx import TensorProto
    model = operator.raw_operator
    graph = _Skl2onnxGraph(scope, container)
    logits, net, elem = _network_of(operator, graph)
    binary = model.out_activation_ == "logistic" and model.n_outputs_ == 1
    if model.out_activation_ == "softmax":
        proba = graph.node("Softmax", [logits], hint="softmax", axis=-1)
    else:
        proba = graph.node("Sigmoid", [logits], hint="sigmoid")
        if binary:
            one = graph.constant("one", np.ones((1, 1), dtype=net.dtype))
            negative = graph.node("Sub", [one, proba], hint="negative_proba")
            proba = graph.node("Concat", [negative, proba], hint="binary_proba", axis=1)
    graph.cast(proba, elem, _tensor_type(operator.outputs[1]), out=operator.outputs[1].full_name)

    label = operator.outputs[0].full_name
    if _is_multilabel(model):
        positive = graph.node("Greater", [logits, graph.constant("zero", np.zeros((1, 1), net.dtype))],
                              hint="positive")
        graph.node("Cast", [positive], out=label, to=TensorProto.INT64)
        return
    if binary:
        positive = graph.node("Greater", [logits, graph.constant("zero", np.zeros((1, 1), net.dtype))],
                              hint="positive")
        index = graph.node("Cast", [positive], hint="positive_index", to=TensorProto.INT64)
        index = graph.node("Reshape", [index, graph.constant("flat", np.array([-1], dtype=np.int64))],
                           hint="class_index")
    else:
        index = graph.node("ArgMax", [logits], hint="class_index", axis=1, keepdims=0)
    graph.node("Gather", [graph.constant("classes", _labels_of(operator)), index], out=label, axis=0)


def _regressor_shapes(operator):
    """Output type: variable (N, n_outputs), float or double like the input."""
    from skl2onnx.common.utils import check_input_and_output_numbers
    check_input_and_output_numbers(operator, input_count_range=1, output_count_range=1)
    n = operator.inputs[0].get_first_dimension()
    operator.outputs[0].set_type(
        _output_float_type(operator.inputs[0])([n, operator.raw_operator.n_outputs_]))


def _convert_regressor(scope, operator, container):
    """The drop-in's predict, shape (N, n_outputs): the network's raw output, or its exp
    (the Poisson rate) for loss="poisson"."""
    graph = _Skl2onnxGraph(scope, container)
    values, _, elem = _network_of(operator, graph)
    if operator.raw_operator.out_activation_ == "exp":
        values = graph.node("Exp", [values], hint="rate")
    graph.cast(values, elem, _tensor_type(operator.outputs[0]), out=operator.outputs[0].full_name)


def _register_skl2onnx_converters():
    """Tell skl2onnx how to convert cprop's drop-ins; False when skl2onnx is not installed."""
    try:
        from skl2onnx import update_registered_converter
    except ImportError:
        return False
    from .sklearn import MLPClassifier, MLPRegressor
    # declaring the zipmap option makes skl2onnx's classifier parser add its usual ZipMap
    # (which reads nocl: class indices instead of labels)
    update_registered_converter(MLPClassifier, "CpropMLPClassifier", _classifier_shapes,
                                _convert_classifier,
                                options={"zipmap": [True, False, "columns"], "nocl": [False, True]})
    update_registered_converter(MLPRegressor, "CpropMLPRegressor", _regressor_shapes, _convert_regressor)
    return True


SKL2ONNX_REGISTERED = _register_skl2onnx_converters()
