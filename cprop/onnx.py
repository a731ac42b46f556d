"""ONNX export: a cprop network as a standard ONNX graph, for ONNX Runtime and every other deployer.

The graph takes ``X`` of shape (N, n_inputs), N dynamic, in the network's dtype
(float32 or float64) and returns the raw output ``logits`` (what
``net.predict_raw`` computes: the inference path), or ``probabilities`` when a
softmax or sigmoid head is appended::

    net.to_onnx("model.onnx", head="softmax")      # or cprop.onnx.export(net, ...)

    import onnxruntime
    session = onnxruntime.InferenceSession("model.onnx")
    proba = session.run(None, {"X": X.astype(np.float32)})[0]

Each layer becomes standard ONNX operators (default opset 17, ONNX Runtime 1.13
and later; any opset from 13 can be asked for), its parameters and running
statistics stored as initializers:

- Dense: ``Gemm`` (``X·W + b``), then the activation.
- Dropout: nothing (inference is the identity).
- BatchNorm: ``BatchNormalization`` with the running statistics, then the activation.
- LayerNorm: ``LayerNormalization`` over the last axis (float32 from opset 17;
  below that, and in float64, the decomposition ReduceMean, Sub, Mul,
  ReduceMean, Add, Sqrt, Div, Mul, Add), then the activation.
- Activations: Relu; LeakyRelu with the layer's slope; Sigmoid; Tanh; Elu;
  Softplus; gelu as ``Gelu`` (float32 from opset 20) or 0.5·x·(1 + Erf(x/√2));
  gelu_tanh as ``Gelu(approximate="tanh")`` (float32 from opset 20) or
  0.5·x·(1 + Tanh(√(2/π)(x + 0.044715x³))); silu as x·Sigmoid(x).

float64 networks get float64 arithmetic throughout, which takes two detours:

- ONNX attributes are float32, and 0.01 or 1e-5 as a float32 is not the double
  cprop uses: leaky_relu is Where(x > 0, x, x·slope) with a float64 slope,
  BatchNorm's ε is added to the running variance in float64 (epsilon=0), and
  LayerNorm uses its decomposition with ε as a float64 constant.
- ONNX Runtime (1.32) implements Elu, Softplus and Erf (hence Gelu) for float32 only,
  so float64 graphs spell them in operators it runs in double: elu as
  Relu(x) + Exp(Min(x, 0)) - 1; softplus as Relu(x) + Log(1 + Exp(-|x|)), and x
  itself above 20 (torch's threshold); erf(x) as (2/√π)·x·∫₀¹ exp(-x²u²) du by
  24-point Gauss-Legendre quadrature (an Exp over an (N, width, 24) tensor and a
  MatMul, within 3e-15 of erf) for |x| < 6, and sign(x) from 6 on, where erf is
  ±1 in double. gelu_tanh uses its decomposition, with float64 constants
  (Gelu's definition casts float32 ones).

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
import math
import os

import numpy as np

from .io import write_atomically
from .layers import BatchNorm, Dense, Dropout, LayerNorm
from .network import Sequential

__all__ = ["export", "convert", "DEFAULT_OPSET", "MIN_OPSET"]

# Opset 17 (ONNX 1.12, 2022) is run by every ONNX Runtime since 1.13 and has
# LayerNormalization; opset 20 adds Gelu, which gelu layers otherwise spell with
# Erf. From 13 on, Softmax normalises over the one axis given and Unsqueeze and
# Clip take their axes and bounds as inputs.
DEFAULT_OPSET = 17
MIN_OPSET = 13
LAYER_NORMALIZATION_OPSET = 17
GELU_OPSET = 20
REDUCE_AXES_AS_INPUT_OPSET = 18   # ReduceMean's axes: an attribute before, an input from here
INPUT = "X"
LOGITS = "logits"
PROBABILITIES = "probabilities"
PREDICTIONS = "predictions"

# erf(x) = (2/√π)·x·∫₀¹ exp(-x²u²) du, the integral by Gauss-Legendre on [0, 1]:
# 24 nodes bring it within 3e-15 of erf for |x| <= 6 (16 nodes: 6e-11)
ERF_NODES = 24
ERF_CLIP = 6.0      # erfc(6) = 2e-17: erf is ±1 in double from here on


def _require_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError('ONNX export needs the onnx package: pip install "cprop[onnx]"') from exc
    return onnx


# -- activation builders -------------------------------------------------------------------------
# Each takes a graph (_Graph or _Skl2onnxGraph: it knows the dtype and the opset), the
# name of its input value, the layer's activation parameter alpha (leaky_relu's slope),
# a readable `hint` for the names of its values and `out`, the name its result must
# have (None: any), and returns the name of its output.

def _unary(op_type, **attrs):
    """Builder of a one-input node: Relu, Sigmoid, Softmax, ..."""
    def build(graph, x, alpha=None, *, hint, out=None):
        return graph.node(op_type, [x], out=out, hint=hint, **attrs)
    return build


def _is_float32(graph):
    return graph.dtype == np.float32


def _leaky_relu(graph, x, slope, *, hint, out=None):
    """x if x > 0 else slope·x. LeakyRelu's alpha is a float32 attribute, exact for float32
    networks only (0.01 as a float32 differs from the double 0.01 by 2e-10): a float64
    network gets Where(x > 0, x, x·slope) with a float64 slope. (PRelu would take one, but
    ONNX Runtime 1.32 runs it in double at opsets 16 to 18 only.)"""
    if _is_float32(graph):
        return graph.node("LeakyRelu", [x], out=out, hint=hint, alpha=float(slope))
    positive = graph.node("Greater", [x, graph.scalar(f"{hint}.zero", 0)], hint=f"{hint}.positive")
    sloped = graph.node("Mul", [x, graph.scalar(f"{hint}.slope", slope)], hint=f"{hint}.sloped")
    return graph.node("Where", [positive, x, sloped], out=out, hint=hint)


def _elu(graph, x, alpha=None, *, hint, out=None):
    """x if x > 0 else e^x - 1 (alpha 1): Elu, or in float64 Relu(x) + (Exp(Min(x, 0)) - 1)."""
    if _is_float32(graph):
        return graph.node("Elu", [x], out=out, hint=hint, alpha=1.0)
    negative = graph.node("Min", [x, graph.scalar(f"{hint}.zero", 0)], hint=f"{hint}.negative")
    expm1 = graph.node("Sub", [graph.node("Exp", [negative], hint=f"{hint}.exp"),
                               graph.scalar(f"{hint}.one", 1)], hint=f"{hint}.expm1")
    return graph.node("Add", [graph.node("Relu", [x], hint=f"{hint}.positive"), expm1], out=out, hint=hint)


def _softplus(graph, x, alpha=None, *, hint, out=None):
    """log(1 + e^x), and x itself above torch's threshold 20. Softplus has no threshold, but
    beyond it the two differ by less than e^-20 = 2e-9, under half a float32 ulp of x. In
    float64: Relu(x) + Log(1 + Exp(-|x|)) (log(1 + e) for log1p(e): within 1.2e-16), and
    Where(x > 20, x, ·) for the threshold."""
    if _is_float32(graph):
        return graph.node("Softplus", [x], out=out, hint=hint)
    e = graph.node("Exp", [graph.node("Neg", [graph.node("Abs", [x], hint=f"{hint}.abs")], hint=f"{hint}.neg")],
                   hint=f"{hint}.exp")
    log1p = graph.node("Log", [graph.node("Add", [e, graph.scalar(f"{hint}.one", 1)], hint=f"{hint}.1p")],
                       hint=f"{hint}.log1p")
    y = graph.node("Add", [graph.node("Relu", [x], hint=f"{hint}.positive"), log1p], hint=f"{hint}.smooth")
    above = graph.node("Greater", [x, graph.scalar(f"{hint}.threshold", 20)], hint=f"{hint}.above")
    return graph.node("Where", [above, x, y], out=out, hint=hint)


def _erf_float64(graph, x, hint):
    """erf(x) in operators ONNX Runtime runs in double (it has Erf for float32 only):
    (2/√π)·x·Σₖ wₖ·exp(-x²uₖ²), Gauss-Legendre's nodes uₖ and weights wₖ on [0, 1], for
    |x| < 6; sign(x) beyond (exactly: the quadrature's few 1e-15 would grow with |x| in gelu's
    0.5·x·(1 + erf))."""
    nodes, weights = np.polynomial.legendre.leggauss(ERF_NODES)
    u = (nodes + 1) / 2
    w = weights / 2 * (2 / math.sqrt(math.pi))
    bound = graph.scalar(f"{hint}.bound", ERF_CLIP)
    beyond = graph.node("GreaterOrEqual", [graph.node("Abs", [x], hint=f"{hint}.abs"), bound], hint=f"{hint}.beyond")
    sign = graph.node("Sign", [x], hint=f"{hint}.sign")
    x = graph.node("Clip", [x, graph.scalar(f"{hint}.low", -ERF_CLIP), bound], hint=f"{hint}.clipped")
    square = graph.node("Mul", [x, x], hint=f"{hint}.square")
    square = graph.node("Unsqueeze", [square, graph.constant(f"{hint}.last_axis", np.array([-1], np.int64))],
                        hint=f"{hint}.square_column")
    # (N, width, 1)·(ERF_NODES,): every sample's exponent at every quadrature node
    exponent = graph.node("Mul", [square, graph.constant(f"{hint}.minus_u2", -(u * u))], hint=f"{hint}.exponent")
    integrand = graph.node("Exp", [exponent], hint=f"{hint}.integrand")
    integral = graph.node("MatMul", [integrand, graph.constant(f"{hint}.weights", w)], hint=f"{hint}.integral")
    erf = graph.node("Mul", [x, integral], hint=f"{hint}.quadrature")
    return graph.node("Where", [beyond, sign, erf], hint=hint)


def _gelu(graph, x, alpha=None, *, hint, out=None):
    """x·Φ(x) = 0.5·x·(1 + erf(x/√2)): Gelu from opset 20 in float32, otherwise this formula
    with Erf (float32) or the quadrature of _erf_float64."""
    if _is_float32(graph) and graph.opset >= GELU_OPSET:
        return graph.node("Gelu", [x], out=out, hint=hint)
    scaled = graph.node("Mul", [x, graph.scalar(f"{hint}.rsqrt2", 1 / math.sqrt(2))], hint=f"{hint}.scaled")
    erf = (graph.node("Erf", [scaled], hint=f"{hint}.erf") if _is_float32(graph)
           else _erf_float64(graph, scaled, f"{hint}.erf"))
    return _half_x_times_1_plus(graph, x, erf, hint, out)


def _gelu_tanh(graph, x, alpha=None, *, hint, out=None):
    """0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))): Gelu(approximate="tanh") from opset 20 in
    float32, otherwise this formula (always in float64: Gelu's definition casts float32
    constants)."""
    if _is_float32(graph) and graph.opset >= GELU_OPSET:
        return graph.node("Gelu", [x], out=out, hint=hint, approximate="tanh")
    cube = graph.node("Mul", [graph.node("Mul", [x, x], hint=f"{hint}.square"), x], hint=f"{hint}.cube")
    inner = graph.node("Add", [x, graph.node("Mul", [cube, graph.scalar(f"{hint}.c", 0.044715)],
                                             hint=f"{hint}.cubic")], hint=f"{hint}.inner")
    inner = graph.node("Mul", [inner, graph.scalar(f"{hint}.sqrt_2_over_pi", math.sqrt(2 / math.pi))],
                       hint=f"{hint}.argument")
    return _half_x_times_1_plus(graph, x, graph.node("Tanh", [inner], hint=f"{hint}.tanh"), hint, out)


def _half_x_times_1_plus(graph, x, t, hint, out):
    """0.5·x·(1 + t), the outer form both gelus share."""
    half_x = graph.node("Mul", [x, graph.scalar(f"{hint}.half", 0.5)], hint=f"{hint}.half_x")
    one_plus = graph.node("Add", [t, graph.scalar(f"{hint}.one", 1)], hint=f"{hint}.one_plus")
    return graph.node("Mul", [half_x, one_plus], out=out, hint=hint)


def _silu(graph, x, alpha=None, *, hint, out=None):
    """x·σ(x): Mul and Sigmoid."""
    return graph.node("Mul", [x, graph.node("Sigmoid", [x], hint=f"{hint}.sigmoid")], out=out, hint=hint)


# cprop activation name -> builder; None: nothing to add
ACTIVATIONS = {
    "identity": None,
    "relu": _unary("Relu"),
    "leaky_relu": _leaky_relu,
    "sigmoid": _unary("Sigmoid"),
    "tanh": _unary("Tanh"),
    "elu": _elu,
    "softplus": _softplus,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": _silu,
}

# head name -> builder of the probabilities from the logits
HEADS = {
    "softmax": _unary("Softmax", axis=-1),
    "sigmoid": _unary("Sigmoid"),
}


# -- layer builders ------------------------------------------------------------------------------
# Each takes the graph, the layer, its index, the name of its input value and the name
# its output must have (None: any), and returns the name of its output.

def _activation_builder(layer, i):
    """The layer's activation builder (None for identity); a ValueError, before any node is
    added, when cprop.onnx has no ONNX form for it."""
    if layer.activation not in ACTIVATIONS:
        raise ValueError(f"cannot export layer {i} ({layer!r}) to ONNX: no ONNX form for activation "
                         f"{layer.activation!r}; cprop.onnx knows {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[layer.activation]


def _activate(graph, layer, i, activation, z, out):
    """f(z) for the layer's activation builder (z itself for identity)."""
    if activation is None:
        return z
    return activation(graph, z, layer._alpha, hint=f"layer{i}.{layer.activation}", out=out)


def _dense(graph, layer, i, x, out):
    """Y = f(X·W + b): a Gemm, then the activation's nodes (none for identity)."""
    activation = _activation_builder(layer, i)
    W = graph.constant(f"layer{i}.W", layer.W)
    b = graph.constant(f"layer{i}.b", layer.b)
    z = graph.node("Gemm", [x, W, b], out=out if activation is None else None, hint=f"layer{i}.linear")
    return _activate(graph, layer, i, activation, z, out)


def _dropout(graph, layer, i, x, out):
    """Inference is the identity: no node, but an Identity when the output must be named."""
    return x if out is None else graph.node("Identity", [x], out=out)


def _gamma_beta(graph, layer, i):
    """The names of γ and β: the layer's, or 1 and 0 without the affine step."""
    gamma, beta = layer.gamma, layer.beta
    if gamma is None:
        gamma, beta = np.ones(layer.n_out, graph.dtype), np.zeros(layer.n_out, graph.dtype)
    return graph.constant(f"layer{i}.gamma", gamma), graph.constant(f"layer{i}.beta", beta)


def _batchnorm(graph, layer, i, x, out):
    """Evaluation: y = f((x - running_mean)·γ/√(running_var + ε) + β), a BatchNormalization.
    Its epsilon is a float32 attribute: a float64 network's ε is added to the running
    variance in float64 instead (epsilon 0), as cprop computes running_var + ε."""
    activation = _activation_builder(layer, i)
    gamma, beta = _gamma_beta(graph, layer, i)
    mean = graph.constant(f"layer{i}.running_mean", layer.running_mean)
    if _is_float32(graph):
        var, epsilon = graph.constant(f"layer{i}.running_var", layer.running_var), layer.eps
    else:
        var, epsilon = graph.constant(f"layer{i}.running_var_plus_eps", layer.running_var + layer.eps), 0.0
    z = graph.node("BatchNormalization", [x, gamma, beta, mean, var], epsilon=float(epsilon),
                   out=out if activation is None else None, hint=f"layer{i}.batchnorm")
    return _activate(graph, layer, i, activation, z, out)


def _layernorm(graph, layer, i, x, out):
    """y = f((x - mean)/√(var + ε)·γ + β), the statistics over each row: LayerNormalization
    in float32 from opset 17; else, and in float64 (ε as a float64 constant; the
    attribute is float32), its decomposition."""
    activation = _activation_builder(layer, i)
    z_out = out if activation is None else None
    hint = f"layer{i}.layernorm"
    if _is_float32(graph) and graph.opset >= LAYER_NORMALIZATION_OPSET:
        gamma, beta = _gamma_beta(graph, layer, i)
        z = graph.node("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=float(layer.eps),
                       out=z_out, hint=hint)
        return _activate(graph, layer, i, activation, z, out)
    mean = _row_mean(graph, x, f"{hint}.mean")
    centred = graph.node("Sub", [x, mean], hint=f"{hint}.centred")
    var = _row_mean(graph, graph.node("Mul", [centred, centred], hint=f"{hint}.squared"), f"{hint}.var")
    std = graph.node("Sqrt", [graph.node("Add", [var, graph.scalar(f"{hint}.eps", layer.eps)],
                                         hint=f"{hint}.var_eps")], hint=f"{hint}.std")
    z = graph.node("Div", [centred, std], out=z_out if layer.gamma is None else None, hint=f"{hint}.normalized")
    if layer.gamma is not None:
        gamma, beta = _gamma_beta(graph, layer, i)
        z = graph.node("Add", [graph.node("Mul", [z, gamma], hint=f"{hint}.scaled"), beta], out=z_out, hint=hint)
    return _activate(graph, layer, i, activation, z, out)


def _row_mean(graph, x, hint):
    """Each row's mean, shape (N, 1): ReduceMean over the last axis."""
    if graph.opset >= REDUCE_AXES_AS_INPUT_OPSET:
        axes = graph.constant(f"{hint}.axes", np.array([-1], np.int64))
        return graph.node("ReduceMean", [x, axes], keepdims=1, hint=hint)
    return graph.node("ReduceMean", [x], axes=[-1], keepdims=1, hint=hint)


# layer kind -> builder(graph, layer, index, input name, output name or None) -> output name
LAYERS = {Dense: _dense, Dropout: _dropout, BatchNorm: _batchnorm, LayerNorm: _layernorm}


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
    """The nodes and initializers of a standalone graph, with unique readable names, in the
    network's dtype and an opset."""

    def __init__(self, onnx, dtype, opset):
        self.onnx, self.dtype, self.opset = onnx, np.dtype(dtype), int(opset)
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

    def scalar(self, hint, value):
        """A scalar constant in the graph's dtype."""
        return self.constant(hint, np.array(value, dtype=self.dtype))

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
    if not np.isfinite(net.buffers).all():
        raise ValueError("the network's running statistics contain NaN or infinite values; "
                         "refusing to export them")
    for i, layer in enumerate(net.layers):
        if isinstance(layer, BatchNorm) and (layer.running_var < 0).any():
            raise ValueError(f"layer {i} ({layer!r}) has a negative running variance; refusing to export it")


def check_opset(opset: int | None) -> int:
    """The opset to write: DEFAULT_OPSET for None, else an integer from MIN_OPSET to the
    installed onnx's newest (ValueError otherwise; ImportError without onnx)."""
    onnx = _require_onnx()
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {newest} (this onnx's newest), "
                         f"got {opset!r}")
    return int(opset)


def convert(net: Sequential, *, head: str | None = None, opset: int | None = None,
            standardize: tuple | None = None, unstandardize: tuple | None = None):
    """The ONNX model (an ``onnx.ModelProto``) of `net`; see :func:`export`, which writes it."""
    onnx = _require_onnx()
    helper = onnx.helper
    _check_net(net)
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be None or one of {sorted(HEADS)}, got {head!r}")
    if head is not None and unstandardize is not None:
        raise ValueError(f"unstandardize scales raw outputs (regression); it cannot follow head={head!r}")
    opset = check_opset(opset)
    dtype = np.dtype(net.dtype)
    graph = _Graph(onnx, dtype, opset)
    x = INPUT
    if standardize is not None:
        mean, std = _check_scaling(standardize, net.n_inputs, "standardize", dtype)
        x = graph.node("Sub", [x, graph.constant("input.mean", mean.astype(dtype))], hint="input.centred")
        x = graph.node("Div", [x, graph.constant("input.std", std.astype(dtype))], hint="input.standardised")
    logits = _network_nodes(graph, net, x, out=LOGITS)
    output = LOGITS
    if head is not None:
        output = HEADS[head](graph, logits, hint=PROBABILITIES, out=PROBABILITIES)
    elif unstandardize is not None:
        mean, std = _check_scaling(unstandardize, net.n_outputs, "unstandardize", dtype)
        y = graph.node("Mul", [logits, graph.constant("output.std", std.astype(dtype))], hint="output.scaled")
        output = graph.node("Add", [y, graph.constant("output.mean", mean.astype(dtype))], out=PREDICTIONS)
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


def _check_scaling(pair, width, name, dtype):
    """(mean, std) as float64 arrays of `width` values, std > 0, all finite, and within what
    the graph's `dtype` holds (mean finite, std a normal number: its constants are cast)."""
    try:
        mean, std = (np.asarray(a, dtype=np.float64) for a in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (mean, std) pair of arrays") from None
    for part, arr in (("mean", mean), ("std", std)):
        if arr.shape != (width,) or not np.isfinite(arr).all():
            raise ValueError(f"{name}: {part} must hold {width} finite values, got shape {arr.shape}")
    if (std <= 0).any():
        raise ValueError(f"{name}: every std must be > 0")
    info = np.finfo(dtype)
    if (np.abs(mean) > info.max).any() or (std < info.tiny).any() or (std > info.max).any():
        raise ValueError(f"{name}: mean and std must be within {np.dtype(dtype).name}'s normal range "
                         f"(|mean| <= {info.max:.3g}, {info.tiny:.3g} <= std <= {info.max:.3g}), "
                         "the graph's constants")
    return mean, std


def export(net: Sequential, path: str | os.PathLike, *, head: str | None = None,
           opset: int | None = None, standardize: tuple | None = None,
           unstandardize: tuple | None = None):
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
        from version 1.13 on. Below 17, float32 LayerNorm is decomposed; from
        20, float32 gelu and gelu_tanh are Gelu nodes.
    standardize : (mean, std), optional
        Arrays of n_inputs values: the graph then computes ``(X - mean) / std``
        before the first layer (what ``cprop train`` models expect).
    unstandardize : (mean, std), optional
        Arrays of n_outputs values, with no head: the graph's output is then
        ``logits·std + mean``, named ``predictions`` (a regression network
        trained on standardised targets, as ``cprop train`` trains them,
        answering in the targets' own units).

    The graph's input is ``X``, shape (N, n_inputs) with N dynamic, in the
    network's dtype; it computes what ``net.predict_raw`` does (Dropout is the
    identity, BatchNorm uses its running statistics), with the operators listed
    in the module's docstring. A layer or activation without an ONNX form, or
    non-finite parameters or running statistics, raise ValueError.
    """
    model = convert(net, head=head, opset=opset, standardize=standardize, unstandardize=unstandardize)
    if model.ByteSize() >= 2 ** 31:
        raise ValueError("the network is too large for a single ONNX file (protobuf's 2 GB limit)")
    data = model.SerializeToString()
    write_atomically(path, lambda f: f.write(data))
    return model


# -- skl2onnx converters for the scikit-learn drop-ins -------------------------------------------

class _Skl2onnxGraph:
    """The builders' graph interface over skl2onnx's scope (names) and container (nodes),
    in the network's dtype and the container's target opset."""

    def __init__(self, scope, container, dtype):
        self.scope, self.container = scope, container
        self.dtype, self.opset = np.dtype(dtype), int(container.target_opset)

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

    def scalar(self, hint, value):
        """A scalar constant in the graph's dtype."""
        return self.constant(hint, np.array(value, dtype=self.dtype))

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


def _network_of(scope, operator, container):
    """The drop-in's network applied to the operator's input (cast to the network's dtype);
    returns the graph, the logits' name, the network and its ONNX element type."""
    from onnx import helper
    net = operator.raw_operator._network()
    _check_net(net)
    graph = _Skl2onnxGraph(scope, container, net.dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(net.dtype))
    x = graph.cast(operator.inputs[0].full_name, _tensor_type(operator.inputs[0]), elem)
    return graph, _network_nodes(graph, net, x), net, elem


def _convert_classifier(scope, operator, container):
    """Labels and probabilities as the drop-in's predict and predict_proba compute them:
    softmax over the logits (multi-class), or sigmoid p giving (1 - p, p) (binary) or one
    probability per label (multi-label); labels from the logits' argmax or sign."""
    from onnx import TensorProto
    model = operator.raw_operator
    graph, logits, net, elem = _network_of(scope, operator, container)
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
    graph, values, _, elem = _network_of(scope, operator, container)
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
