"""Backprop checked three ways: cprop.gradient_check, finite differences written here,
and PyTorch's autograd and optimizers (skipped when torch is not installed)."""
import numpy as np
import pytest
from numpy.testing import assert_allclose

import cprop

import reference as ref
from conftest import ACTIVATIONS, LOSSES, TOLERANCES, activations_of, flat, layers_of, make_net, make_targets

ARCHITECTURES = [[5, 7, 4], [5, 7, 6, 3]]


@pytest.mark.parametrize("sizes", ARCHITECTURES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("output", ["identity", "same"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradient_check(activation, loss, output, sizes, rng):
    net = make_net(sizes, hidden=activation, output=activation if output == "same" else "identity")
    X = rng.normal(size=(8, sizes[0]))
    y = make_targets(loss, 8, sizes[-1], rng)

    result = cprop.gradient_check(net, X, y, loss=loss)
    assert result < 1e-6 and result.passed


def test_gradient_check_catches_a_wrong_gradient(rng, monkeypatch):
    # the check itself must be able to fail: halve every backprop gradient
    net = make_net([5, 7, 4])
    X, y = rng.normal(size=(8, 5)), rng.normal(size=(8, 4))
    backward = cprop.Sequential.backward

    def half_backward(self, grad_out, n_threads=None):
        return backward(self, grad_out / 2, n_threads)

    monkeypatch.setattr(cprop.Sequential, "backward", half_backward)
    result = cprop.gradient_check(net, X, y, loss="mse")
    assert result > 0.4 and not result.passed
    assert "FAILED" in repr(result) and result.tol == 1e-6


def test_gradient_check_of_a_trained_confident_network():
    """The README's check: a relu network trained on digits until its predictions are
    confident, where the cross-entropy's log-sum-exp cancels (per-sample loss ~1e-5 out
    of logits ~10): the default step and floor keep the finite differences' rounding below
    tol, whichever core trained it."""
    X, y = cprop.datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(X))
    net = cprop.Sequential([cprop.Dense(64, 64, "relu"), cprop.Dense(64, 10)], dtype="float32", seed=0)
    trainer = cprop.Trainer(net, loss="cross_entropy", optimizer=cprop.SGD(lr=0.05, momentum=0.9),
                            batch_size=32, seed=0)
    trainer.fit(X[order[:1440]], y[order[:1440]], epochs=30)
    assert trainer.evaluate(X[order[1440:]], y[order[1440:]])["accuracy"] > 0.95
    for s in range(6):
        batch = order[32 * s:32 * (s + 1)]
        result = cprop.gradient_check(net, X[batch], y[batch], loss="cross_entropy")
        assert result.passed, result


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_finite_differences(activation, loss, rng):
    """Central differences of the reference loss, against cprop's backprop, on a few parameters."""
    net = make_net([5, 7, 6, 3], hidden=activation)
    X = rng.normal(size=(10, 5))
    y = make_targets(loss, 10, 3, rng)
    net.backward(getattr(cprop.losses, loss)(net.forward(X), y)[1])

    def reference_loss():
        outputs = ref.forward(layers_of(net), activations_of(net), X)
        return ref.LOSSES[loss](outputs[-1], y)[0]

    eps = 1e-6
    first_W, last_b = 0, net.n_params - 1
    middle_W = 5 * 7 + 7 + 3 * 6 + 4           # layer 1's W[3, 4]
    for i in (first_W, middle_W, last_b):
        saved = net.params[i]
        net.params[i] = saved + eps
        plus = reference_loss()
        net.params[i] = saved - eps
        minus = reference_loss()
        net.params[i] = saved
        assert net.grads[i] == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-9)
    assert net.layers[1].dW[3, 4] == net.grads[middle_W]


# -- PyTorch -----------------------------------------------------------------------

def torch_model(net):
    """The torch.nn.Sequential computing the same function as `net`, with the same parameters
    (torch's Linear weight is (out, in): cprop's W transposed)."""
    torch = pytest.importorskip("torch")
    modules = {"identity": torch.nn.Identity, "relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid,
               "tanh": torch.nn.Tanh, "leaky_relu": lambda: torch.nn.LeakyReLU(0.01)}
    torch_dtype = torch.float64 if net.dtype == np.float64 else torch.float32
    parts = []
    for layer in net.layers:
        linear = torch.nn.Linear(layer.n_in, layer.n_out, dtype=torch_dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(layer.W.T.copy()))
            linear.bias.copy_(torch.from_numpy(layer.b.copy()))
        parts += [linear, modules[layer.activation]()]
    return torch.nn.Sequential(*parts)


def torch_loss(loss, out, y):
    torch = pytest.importorskip("torch")
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(out, torch.from_numpy(np.asarray(y, dtype=np.int64)))
    target = torch.from_numpy(np.asarray(y)).to(out.dtype).reshape(out.shape)
    if loss == "mse":
        return torch.nn.functional.mse_loss(out, target)
    if loss == "poisson":
        return torch.nn.functional.poisson_nll_loss(out, target, log_input=True)
    if loss == "l1":
        return torch.nn.functional.l1_loss(out, target)
    if loss == "huber":
        return torch.nn.functional.huber_loss(out, target, delta=1.0)
    assert loss == "binary_cross_entropy", loss
    return torch.nn.functional.binary_cross_entropy_with_logits(out, target)


def torch_flat(model, grad=False):
    """torch's parameters (or their gradients) in cprop's flat layout W0 b0 W1 b1 …"""
    def value(p):
        return (p.grad if grad else p).detach().numpy()
    return flat([(value(m.weight).T, value(m.bias)) for m in model if hasattr(m, "weight")])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_torch_autograd(activation, loss, dtype, tol, rng):
    torch = pytest.importorskip("torch")
    net = make_net([5, 7, 6, 3], hidden=activation, output=activation, dtype=dtype)
    model = torch_model(net)
    X = rng.normal(size=(11, 5)).astype(dtype)
    y = make_targets(loss, 11, 3, rng)

    out = net.forward(X)
    value, grad = getattr(cprop.losses, loss)(out, y)
    net.backward(grad)

    torch_out = model(torch.from_numpy(X))
    torch_value = torch_loss(loss, torch_out, y)
    torch_value.backward()
    assert_allclose(out, torch_out.detach().numpy(), **tol)
    assert value == pytest.approx(torch_value.item(), rel=tol["rtol"], abs=tol["atol"])
    assert_allclose(net.grads, torch_flat(model, grad=True), **tol)


OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("AdamW", {"lr": 0.01}),
    ("AdamW", {"lr": 0.01, "betas": (0.5, 0.9), "weight_decay": 0.2}),
]


@pytest.mark.parametrize("name, config", OPTIMIZERS, ids=str)
def test_optimizer_matches_torch(name, config, rng):
    torch = pytest.importorskip("torch")
    net = make_net([5, 7, 6, 3], hidden="tanh")
    model = torch_model(net)
    optimizer = getattr(cprop, name)(**config)
    torch_optimizer = getattr(torch.optim, name)(model.parameters(), **config)

    for _ in range(6):
        X = rng.normal(size=(8, 5))
        y = rng.integers(0, 3, 8)
        net.backward(cprop.losses.cross_entropy(net.forward(X), y)[1])
        optimizer.step(net)
        torch_optimizer.zero_grad()
        torch_loss("cross_entropy", model(torch.from_numpy(X)), y).backward()
        torch_optimizer.step()
        assert_allclose(net.params, torch_flat(model), **TOLERANCES[np.float64])
