# Optimizer updates in one place: one fused pass per parameter array, with
# torch.optim's conventions. A new value that is not finite is never written:
# the parameter keeps its previous value and the step reports it, so training
# that diverges leaves finite weights behind.
#
#   SGD:  g' = g + wd·p;  v = μ·v + g';  p -= lr·v   (Nesterov: p -= lr·(g' + μ·v))
#   Adam: g' = g + wd·p (AdamW instead: p *= 1 - lr·wd);  m += (1-β1)(g' - m);
#         v = β2·v + (1-β2)·g'²;  p -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + ε)
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, fabs, pow
from libc.float cimport FLT_MAX, DBL_MAX

cdef enum:
    SGD = 0
    ADAM = 1

# below this many parameters per thread an update is faster on one thread
cdef enum:
    MIN_PARAMS_PER_THREAD = 1 << 15

cdef struct Optim:
    int kind
    double lr, momentum, weight_decay, beta1, beta2, eps
    bint nesterov, decoupled, decay_bias
    Py_ssize_t step             # Adam's t: steps taken so far


cdef inline bint _finite(floating x) noexcept nogil:
    if floating is float:
        return fabs(x) <= FLT_MAX
    else:
        return fabs(x) <= DBL_MAX


cdef inline Py_ssize_t sgd_range(floating* p, const floating* g, floating* v,
                                 Py_ssize_t lo, Py_ssize_t hi, floating lr, floating mu,
                                 floating wd, bint nesterov) noexcept nogil:
    """SGD on p[lo:hi]; v is NULL when μ = 0. Returns how many new values were not finite."""
    cdef Py_ssize_t i, rejected = 0
    cdef floating gi, vi, pi
    for i in range(lo, hi):
        gi = g[i] + wd * p[i]
        if v != NULL:
            vi = mu * v[i] + gi
            gi = gi + mu * vi if nesterov else vi
        pi = p[i] - lr * gi
        if _finite(pi):
            p[i] = pi
            if v != NULL:
                v[i] = vi
        else:
            rejected += 1
    return rejected


cdef inline Py_ssize_t adam_range(floating* p, const floating* g, floating* m, floating* v,
                                  Py_ssize_t lo, Py_ssize_t hi, floating lr, floating beta1,
                                  floating beta2, floating eps, floating wd, bint decoupled,
                                  floating step_size, floating sqrt_bc2) noexcept nogil:
    """Adam (or AdamW when decoupled) on p[lo:hi]. Returns how many new values were not finite."""
    cdef Py_ssize_t i, rejected = 0
    cdef floating gi, mi, vi, pi
    for i in range(lo, hi):
        gi = g[i]
        pi = p[i]
        if decoupled:
            pi = pi * (1 - lr * wd)
        else:
            gi = gi + wd * pi
        mi = m[i] + (1 - beta1) * (gi - m[i])
        vi = beta2 * v[i] + (1 - beta2) * gi * gi
        pi = pi - step_size * mi / (sqrt(vi) / sqrt_bc2 + eps)
        if _finite(pi):
            p[i] = pi
            m[i] = mi
            v[i] = vi
        else:
            rejected += 1
    return rejected


cdef inline Py_ssize_t _optim_chunk(const Optim* opt, floating* p, const floating* g,
                                    floating* a, floating* b, Py_ssize_t lo, Py_ssize_t hi,
                                    floating wd, floating step_size, floating sqrt_bc2) noexcept nogil:
    if opt.kind == ADAM:
        return adam_range(p, g, a, b, lo, hi, <floating> opt.lr, <floating> opt.beta1,
                          <floating> opt.beta2, <floating> opt.eps, wd, opt.decoupled,
                          step_size, sqrt_bc2)
    return sgd_range(p, g, a, lo, hi, <floating> opt.lr, <floating> opt.momentum, wd, opt.nesterov)


cdef inline Py_ssize_t optim_step(const Optim* opt, floating* p, const floating* g,
                                  floating* a, floating* b, Py_ssize_t lo, Py_ssize_t hi,
                                  bint decay, int n_threads) noexcept nogil:
    """One optimizer step on p[lo:hi] (Adam's t already advanced); a, b: its state arrays."""
    cdef floating wd = <floating> opt.weight_decay if decay else 0
    cdef floating step_size = 0, sqrt_bc2 = 0
    cdef Py_ssize_t rejected = 0, n = hi - lo
    cdef int t, nt = n_threads
    if n // MIN_PARAMS_PER_THREAD < nt:
        nt = <int> (n // MIN_PARAMS_PER_THREAD)
    if nt < 1:
        nt = 1
    if opt.kind == ADAM:
        step_size = <floating> (opt.lr / (1 - pow(opt.beta1, <double> opt.step)))
        sqrt_bc2 = <floating> sqrt(1 - pow(opt.beta2, <double> opt.step))
    if opt.kind == SGD and opt.momentum == 0:
        a = NULL
    if nt == 1:
        return _optim_chunk(opt, p, g, a, b, lo, hi, wd, step_size, sqrt_bc2)
    for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
        rejected += _optim_chunk(opt, p, g, a, b, lo + n * t // nt, lo + n * (t + 1) // nt,
                                 wd, step_size, sqrt_bc2)
    return rejected
