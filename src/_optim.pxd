# Optimizer updates in one place: one fused pass per parameter array, with
# torch.optim's conventions. A new value that is not finite is never written:
# the parameter keeps its previous value (and state) and the step reports it, so
# training that diverges leaves finite weights and optimizer state behind.
#
#   SGD:  g' = g + wd·p;  v = μ·v + g';  p -= lr·v   (Nesterov: p -= lr·(g' + μ·v))
#   Adam: g' = g + wd·p (AdamW instead: p *= 1 - lr·wd);  m += (1-β1)(g' - m);
#         v = β2·v + (1-β2)·g'²;  p -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + ε)
#   Adam, scikit-learn's (sklearn_style): ε added to √v before the bias correction,
#         p -= lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + ε), each term computed as scikit-learn
#         computes it (m = β1·m + (1-β1)·g'), so both take the same steps to rounding
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt, sqrtf, fabs, fabsf, pow
from libc.string cimport memcpy
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
    double clip_norm            # > 0: the gradient is clipped to this global norm (see below)
    bint nesterov, decoupled, decay_bias
    bint sklearn_style          # Adam: scikit-learn's placement of ε (see above)
    bint decay_per_sample       # weight decay divided by the batch's size (scikit-learn's alpha)
    Py_ssize_t step             # Adam's t: steps taken so far


cdef enum:
    BLOCK = 512     # elements per block: the new values wait in L1-resident buffers


cdef inline bint _nonfinite(floating x) noexcept nogil:
    if floating is float:
        return not (fabsf(x) <= FLT_MAX)
    else:
        return not (fabs(x) <= DBL_MAX)


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline int _commit(floating* p, floating* a, floating* b,
                        const floating* new_p, const floating* new_a, const floating* new_b,
                        Py_ssize_t n, int n_bad) noexcept nogil:
    """Write a block's new values (a, b: state, either may be NULL); when some new value
    (p or its state) is not finite, that element keeps all its old values. Returns n_bad."""
    cdef Py_ssize_t k
    if n_bad == 0:
        memcpy(p, new_p, n * sizeof(floating))
        if a != NULL:
            memcpy(a, new_a, n * sizeof(floating))
        if b != NULL:
            memcpy(b, new_b, n * sizeof(floating))
        return 0
    for k in range(n):
        if not (_nonfinite(new_p[k]) or (a != NULL and _nonfinite(new_a[k]))
                or (b != NULL and _nonfinite(new_b[k]))):
            p[k] = new_p[k]
            if a != NULL:
                a[k] = new_a[k]
            if b != NULL:
                b[k] = new_b[k]
    return n_bad


# Each update computes a block of new values into stack buffers (a branch-free
# loop that vectorizes), then commits the block: so a step whose result is not
# finite never reaches the parameters.

cdef inline Py_ssize_t sgd_range(floating* p, const floating* g, floating* v,
                                 Py_ssize_t lo, Py_ssize_t hi, floating lr, floating mu,
                                 floating wd, bint nesterov) noexcept nogil:
    """SGD on p[lo:hi]; v is NULL when μ = 0. Returns how many new values were not finite."""
    cdef floating new_p[BLOCK]
    cdef floating new_v[BLOCK]
    cdef Py_ssize_t i, k, n, rejected = 0
    cdef int bad
    cdef floating gi, vi
    i = lo
    while i < hi:
        n = hi - i if hi - i < BLOCK else BLOCK
        bad = 0
        if v == NULL:
            for k in range(n):
                new_p[k] = p[i + k] - lr * (g[i + k] + wd * p[i + k])
                bad += _nonfinite(new_p[k])
        elif nesterov:
            for k in range(n):
                gi = g[i + k] + wd * p[i + k]
                vi = mu * v[i + k] + gi
                new_v[k] = vi
                new_p[k] = p[i + k] - lr * (gi + mu * vi)
                bad += _nonfinite(new_p[k])
        else:
            for k in range(n):
                vi = mu * v[i + k] + g[i + k] + wd * p[i + k]
                new_v[k] = vi
                new_p[k] = p[i + k] - lr * vi
                bad += _nonfinite(new_p[k])
        rejected += _commit(p + i, NULL if v == NULL else v + i, <floating*> NULL,
                            new_p, new_v, new_v, n, bad)
        i += n
    return rejected


cdef inline Py_ssize_t adam_range(floating* p, const floating* g, floating* m, floating* v,
                                  Py_ssize_t lo, Py_ssize_t hi, floating lr, floating beta1,
                                  floating beta2, floating eps, floating wd, bint decoupled,
                                  floating step_size, floating sqrt_bc2) noexcept nogil:
    """Adam (or AdamW when decoupled) on p[lo:hi]. Returns how many new values were not finite."""
    cdef floating new_p[BLOCK]
    cdef floating new_m[BLOCK]
    cdef floating new_v[BLOCK]
    cdef Py_ssize_t i, k, n, rejected = 0
    cdef int bad
    cdef floating gi, mi, vi
    # decoupled (AdamW): p·(1 - lr·wd) and no decay in g; else (Adam): g + wd·p
    cdef floating shrink = 1 - lr * wd if decoupled else 1
    cdef floating l2 = 0 if decoupled else wd
    i = lo
    while i < hi:
        n = hi - i if hi - i < BLOCK else BLOCK
        bad = 0
        for k in range(n):
            gi = g[i + k] + l2 * p[i + k]
            mi = m[i + k] + (1 - beta1) * (gi - m[i + k])
            vi = beta2 * v[i + k] + (1 - beta2) * gi * gi
            new_m[k] = mi
            new_v[k] = vi
            new_p[k] = p[i + k] * shrink - step_size * mi / (_sqrt(vi) / sqrt_bc2 + eps)
            # v = inf (g² overflowed) leaves p finite but would freeze it for good: refused too
            bad += _nonfinite(new_p[k]) | _nonfinite(vi)
        rejected += _commit(p + i, m + i, v + i, new_p, new_m, new_v, n, bad)
        i += n
    return rejected


cdef inline Py_ssize_t adam_sklearn_range(floating* p, const floating* g, floating* m, floating* v,
                                          Py_ssize_t lo, Py_ssize_t hi, floating beta1,
                                          floating beta2, floating one_minus_beta1,
                                          floating one_minus_beta2, floating eps, floating wd,
                                          floating shrink, floating lr_t) noexcept nogil:
    """scikit-learn's Adam on p[lo:hi], lr_t = lr·√(1-β2ᵗ)/(1-β1ᵗ): the same operations in
    the same order as sklearn's AdamOptimizer. Returns how many new values were not finite."""
    cdef floating new_p[BLOCK]
    cdef floating new_m[BLOCK]
    cdef floating new_v[BLOCK]
    cdef Py_ssize_t i, k, n, rejected = 0
    cdef int bad
    cdef floating gi, mi, vi
    i = lo
    while i < hi:
        n = hi - i if hi - i < BLOCK else BLOCK
        bad = 0
        for k in range(n):
            gi = g[i + k] + wd * p[i + k]
            mi = beta1 * m[i + k] + one_minus_beta1 * gi
            vi = beta2 * v[i + k] + one_minus_beta2 * (gi * gi)
            new_m[k] = mi
            new_v[k] = vi
            new_p[k] = p[i + k] * shrink - lr_t * mi / (_sqrt(vi) + eps)
            bad += _nonfinite(new_p[k]) | _nonfinite(vi)
        rejected += _commit(p + i, m + i, v + i, new_p, new_m, new_v, n, bad)
        i += n
    return rejected


cdef inline Py_ssize_t optim_range(const Optim* opt, floating* p, const floating* g,
                                   floating* a, floating* b, Py_ssize_t lo, Py_ssize_t hi,
                                   bint decay, double batch_weight) noexcept nogil:
    """One optimizer step on p[lo:hi] on this thread (Adam's t already advanced).

    a, b: the state arrays (momentum; Adam's m and v), laid out like p. `decay`:
    whether weight decay applies to this range; `batch_weight`: the batch's size (its
    samples' summed weights when weighted), which decay_per_sample divides by.
    """
    cdef floating wd = 0
    if decay:
        wd = <floating> (opt.weight_decay / batch_weight if opt.decay_per_sample else opt.weight_decay)
    if opt.kind == ADAM and opt.sklearn_style:
        # (1-β) and lr_t in double, as scikit-learn's Python floats
        return adam_sklearn_range(p, g, a, b, lo, hi, <floating> opt.beta1, <floating> opt.beta2,
                                  <floating> (1 - opt.beta1), <floating> (1 - opt.beta2),
                                  <floating> opt.eps, 0 if opt.decoupled else wd,
                                  <floating> (1 - opt.lr * wd) if opt.decoupled else 1,
                                  <floating> (opt.lr * sqrt(1 - pow(opt.beta2, <double> opt.step))
                                              / (1 - pow(opt.beta1, <double> opt.step))))
    if opt.kind == ADAM:
        return adam_range(p, g, a, b, lo, hi, <floating> opt.lr, <floating> opt.beta1,
                          <floating> opt.beta2, <floating> opt.eps, wd, opt.decoupled,
                          <floating> (opt.lr / (1 - pow(opt.beta1, <double> opt.step))),
                          <floating> sqrt(1 - pow(opt.beta2, <double> opt.step)))
    return sgd_range(p, g, a if opt.momentum != 0 else NULL, lo, hi, <floating> opt.lr,
                     <floating> opt.momentum, wd, opt.nesterov)


cdef inline Py_ssize_t optim_step(const Optim* opt, floating* p, const floating* g,
                                  floating* a, floating* b, Py_ssize_t lo, Py_ssize_t hi,
                                  bint decay, double batch_weight, int n_threads) noexcept nogil:
    """optim_range over p[lo:hi], split across threads when it is large enough to pay."""
    cdef Py_ssize_t rejected = 0, n = hi - lo
    cdef int t, nt = n_threads
    if n // MIN_PARAMS_PER_THREAD < nt:
        nt = <int> (n // MIN_PARAMS_PER_THREAD)
    if nt <= 1:
        return optim_range(opt, p, g, a, b, lo, hi, decay, batch_weight)
    for t in prange(nt, num_threads=nt, schedule='static', nogil=True):
        rejected += optim_range(opt, p, g, a, b, lo + n * t // nt, lo + n * (t + 1) // nt,
                                decay, batch_weight)
    return rejected


# Gradient clipping by global norm (torch.nn.utils.clip_grad_norm_, Keras' global_clipnorm):
#   ‖g‖ = √Σ g² over every parameter's gradient;  g *= c / (‖g‖ + 1e-6) when that is < 1.
# Σ g² is taken in fixed blocks of CLIP_BLOCK values, in double, whichever thread computes
# a block, and the blocks are added in order: the same factor for any thread count, and on
# every MPI rank holding the same summed gradient.

cdef enum:
    CLIP_BLOCK = 4096


cdef inline Py_ssize_t clip_blocks(Py_ssize_t n) noexcept nogil:
    """How many blocks of CLIP_BLOCK values cover n."""
    return (n + CLIP_BLOCK - 1) // CLIP_BLOCK


cdef inline void grad_sq_blocks(const floating* g, Py_ssize_t n, double* sums, Py_ssize_t b0,
                                Py_ssize_t b1) noexcept nogil:
    """sums[b] = Σ g[i]² over block b (i in [b·CLIP_BLOCK, (b+1)·CLIP_BLOCK) ∩ [0, n)), for b in
    [b0, b1). Eight partial sums, so the loop vectorizes in program order."""
    cdef double acc[8]
    cdef Py_ssize_t b, i, j, hi
    cdef double x
    for b in range(b0, b1):
        hi = (b + 1) * CLIP_BLOCK if (b + 1) * CLIP_BLOCK < n else n
        for j in range(8):
            acc[j] = 0
        i = b * CLIP_BLOCK
        while i + 8 <= hi:
            for j in range(8):
                x = g[i + j]
                acc[j] += x * x
            i += 8
        while i < hi:
            x = g[i]
            acc[0] += x * x
            i += 1
        sums[b] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef inline double clip_factor(const double* sums, Py_ssize_t n_blocks, double clip_norm) noexcept nogil:
    """The factor the gradient is multiplied by: clip_norm / (‖g‖ + 1e-6) when below 1, else 1
    (also when ‖g‖ is NaN: the step then refuses the non-finite values as it would unclipped)."""
    cdef double total = 0, factor
    cdef Py_ssize_t b
    for b in range(n_blocks):
        total += sums[b]
    factor = clip_norm / (sqrt(total) + 1e-6)
    return factor if factor < 1 else 1


cdef inline void scale_range(floating* g, Py_ssize_t lo, Py_ssize_t hi, double factor) noexcept nogil:
    """g[lo:hi] *= factor, each product in double and rounded once (a float32 factor could
    itself underflow where the norm is near float32's largest)."""
    cdef Py_ssize_t i
    for i in range(lo, hi):
        g[i] = <floating> (g[i] * factor)
