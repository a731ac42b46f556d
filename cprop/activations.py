"""Activation names and the codes the compiled kernels know them by.

The formulas live in src/_activations.pxd (forward fused with the bias add,
derivative through the output): identity, relu, leaky_relu (slope 0.01),
sigmoid, tanh.
"""

ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4}
NAMES = {code: name for name, code in ACTIVATIONS.items()}


def activation_code(name):
    """Kernel code of an activation name; None means identity."""
    if name is None:
        name = "identity"
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)} or None")
    return ACTIVATIONS[name]
