"""Subnormal numbers in cprop's compiled passes: flushed to zero by default.

A parameter whose gradient stays 0 (a dead relu unit, an input that is always 0)
has its momentum decay into the subnormal range and stay there, and arithmetic
on subnormals is up to ~100× slower on many CPUs (a microcode assist per
instruction on Intel's). So every compiled pass (training epochs, gradients,
``forward``/``backward``, optimizer steps, inference) runs with subnormal inputs
and results flushed to zero, as XLA (JAX) and oneDNN do: a value below the
smallest normal number (1.2e-38 in float32, 2.2e-308 in float64) becomes 0.
The calling thread's own mode is restored after each pass, so NumPy and the
rest of the process keep IEEE gradual underflow. ``set_flush_denormals(False)``
gives IEEE semantics inside cprop too (PyTorch's default), at that cost.
See src/_fpenv.pxd.
"""
import numpy as np

from ._lazy import core as _core


def set_flush_denormals(flush: bool) -> None:
    """Set whether cprop's compiled passes flush subnormal numbers to zero (the default: True).

    Applies to the passes that start after the call, in every thread; the process-wide
    setting of the loaded core, like ``torch.set_flush_denormal``. Raises RuntimeError
    for True on a CPU architecture without a flush-to-zero mode (cprop knows x86's
    and aarch64's).

    What flushing changes beyond speed: a hyper-parameter that is itself subnormal in
    the network's dtype reads as 0 (an Adam ``eps`` below 1.2e-38 in float32 then
    divides 0 by 0, and the fit stops with DivergenceError), and squared gradients
    below about 1e-19 (float32) flush, so Adam with an ``eps`` that small steps by
    m/eps where IEEE arithmetic would step by about lr. Turn flushing off for such
    settings, or keep eps at or above ~1e-19 in float32 (1e-154 in float64).
    """
    if not isinstance(flush, (bool, np.bool_)):
        raise TypeError(f"set_flush_denormals expects True or False, got {flush!r}")
    if flush and not _core.FLUSH_SUPPORTED:
        raise RuntimeError("this CPU architecture has no flush-to-zero mode cprop can set")
    _core.set_flush_denormals(bool(flush))


def get_flush_denormals() -> bool:
    """Whether cprop's compiled passes flush subnormal numbers to zero (see set_flush_denormals)."""
    return _core.flush_denormals()
