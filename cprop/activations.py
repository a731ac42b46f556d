"""Activations: names, the compiled kernels' codes, and their PyTorch modules.

The formulas live in src/_activations.pxd: the forward map fused with the bias
add, and the derivative written through the output where it can be (identity,
relu, leaky_relu, sigmoid, tanh, elu, softplus) or through the pre-activation,
which the layer then keeps (gelu, gelu_tanh, silu). The codes are read from the
compiled core (``cprop._core.ACTIVATIONS``), so they cannot drift from its enum.

Adding an activation: a branch in each function of src/_activations.pxd, its
name in the core's ACTIVATIONS dict, and a line in TORCH below.
"""
from __future__ import annotations

from ._lazy import core as _core

# name -> (torch.nn class name, its constructor keywords); the parameter alpha
# (leaky_relu's slope) is passed by Dense itself
TORCH = {
    "identity": ("Identity", {}),
    "relu": ("ReLU", {}),
    "leaky_relu": ("LeakyReLU", {}),          # negative_slope=alpha
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "elu": ("ELU", {"alpha": 1.0}),
    "softplus": ("Softplus", {"beta": 1.0, "threshold": 20.0}),
    "gelu": ("GELU", {"approximate": "none"}),
    "gelu_tanh": ("GELU", {"approximate": "tanh"}),
    "silu": ("SiLU", {}),
}


def names() -> list[str]:
    """Every activation the core knows."""
    return sorted(_core.ACTIVATIONS)


def activation_code(name: str | None) -> int:
    """Kernel code of an activation name; None means identity."""
    if name is None:
        name = "identity"
    if not isinstance(name, str) or name not in _core.ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {names()} or None")
    return _core.ACTIVATIONS[name]


def activation_name(code: int) -> str:
    """The name of a kernel code."""
    return next(name for name, c in _core.ACTIVATIONS.items() if c == code)


def needs_pre_activation(name: str) -> bool:
    """Whether f'(z) needs z itself (the layer then keeps z in the workspace)."""
    return name in _core.NEEDS_Z


def from_torch_module(module) -> tuple[str, float] | None:
    """(activation name, alpha) of a torch activation module, or None when it is not one
    cprop has. Raises ValueError for a known module with settings cprop does not have."""
    kind = type(module).__name__
    if kind == "LeakyReLU":
        return "leaky_relu", float(module.negative_slope)
    if kind == "GELU":
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if kind == "ELU" and float(module.alpha) != 1.0:
        raise ValueError(f"cprop's elu has alpha 1, got ELU(alpha={module.alpha})")
    if kind == "Softplus" and (float(module.beta) != 1.0 or float(module.threshold) != 20.0):
        raise ValueError(f"cprop's softplus has beta 1 and threshold 20, got {module!r}")
    for name, (torch_name, _) in TORCH.items():
        if torch_name == kind and name not in ("gelu", "gelu_tanh", "leaky_relu"):
            return name, 0.0
    return None


def to_torch_module(name: str, alpha: float):
    """The torch.nn module of an activation (None for identity)."""
    import torch
    if name == "identity":
        return None
    if name not in TORCH:
        raise ValueError(f"activation {name!r} has no PyTorch module in cprop's table")
    torch_name, kwargs = TORCH[name]
    if name == "leaky_relu":
        kwargs = {"negative_slope": alpha}
    assert isinstance(kwargs, dict)
    return getattr(torch.nn, torch_name)(**kwargs)
