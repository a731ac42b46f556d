# Losses in one place. Each returns the mean loss (accumulated in double) and
# writes G = ∂loss/∂out, the gradient with respect to the network's raw output.
# Both are multiplied by `scale` (1 for torch's conventions; the scikit-learn
# layer uses it to reproduce scikit-learn's sums and halves).
#   mse:                  L = mean((out - T)²)                     G = 2(out - T) / (n·m)
#   cross_entropy:        L = mean_i(logsumexp(out_i) - out_i[y_i])  G = (softmax(out) - onehot(y)) / n
#   binary_cross_entropy: L = mean(max(z,0) - z·t + log(1 + e^-|z|))  G = (σ(z) - t) / (n·m)
#   poisson:              L = mean(e^z - t·z)  (z: the log of the rate)  G = (e^z - t) / (n·m)
#   l1:                   L = mean(|out - T|)                      G = sign(out - T) / (n·m)
#   huber (δ = 1):        L = mean(½d² if |d| <= 1 else |d| - ½)   G = clamp(d, -1, 1) / (n·m),  d = out - T
# With per-row weights w (not NULL), row i's terms of L and G are multiplied by w_i
# (still divided by n: the caller's scale turns that into a weighted mean).
from cython cimport floating
from libc.math cimport log, log1p, exp, fabs
from _activations cimport _exp, sigmoid

cdef enum:
    MSE = 0
    CROSS_ENTROPY = 1
    BINARY_CROSS_ENTROPY = 2
    POISSON = 3
    L1 = 4
    HUBER = 5


cdef inline double mse(const floating* out, const floating* T, const floating* w, floating* G,
                       Py_ssize_t n, Py_ssize_t m, double scale) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double total = 0, row, d
    cdef floating g_scale = <floating> (scale * 2.0 / (n * m)), g_row
    if w == NULL:
        for i in range(n * m):
            d = <double> out[i] - <double> T[i]
            total += d * d
            G[i] = g_scale * (out[i] - T[i])
        return scale * total / (n * m)
    for i in range(n):
        row = 0
        g_row = g_scale * w[i]
        for j in range(i * m, (i + 1) * m):
            d = <double> out[j] - <double> T[j]
            row += d * d
            G[j] = g_row * (out[j] - T[j])
        total += w[i] * row
    return scale * total / (n * m)


cdef inline double cross_entropy(const floating* out, const Py_ssize_t* labels, const floating* w,
                                 floating* G, Py_ssize_t n, Py_ssize_t m, double scale) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double total = 0
    cdef floating zmax, sumexp
    cdef floating inv_n = <floating> (scale / n)
    cdef floating g_row = inv_n
    cdef const floating* z
    cdef floating* g
    for i in range(n):
        z = out + i * m
        g = G + i * m
        zmax = z[0]
        for j in range(1, m):
            if z[j] > zmax:
                zmax = z[j]
        for j in range(m):   # apart from the sum, so that it vectorizes
            g[j] = _exp(z[j] - zmax)
        sumexp = 0
        for j in range(m):
            sumexp += g[j]
        # log-sum-exp shifted by the max: never overflows
        if w == NULL:
            total += zmax + log(sumexp) - z[labels[i]]
        else:
            total += w[i] * (zmax + log(sumexp) - z[labels[i]])
            g_row = inv_n * w[i]
        sumexp = g_row / sumexp
        for j in range(m):
            g[j] *= sumexp
        g[labels[i]] -= g_row
    return scale * total / n


cdef inline double binary_cross_entropy(const floating* out, const floating* T, const floating* w,
                                        floating* G, Py_ssize_t n, Py_ssize_t m,
                                        double scale) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double total = 0, row, z
    cdef floating g_scale = <floating> (scale / (n * m)), g_row
    if w == NULL:
        for i in range(n * m):
            z = out[i]
            total += (z if z > 0 else 0) - z * T[i] + log1p(exp(-fabs(z)))
            G[i] = g_scale * (sigmoid(out[i]) - T[i])
        return scale * total / (n * m)
    for i in range(n):
        row = 0
        g_row = g_scale * w[i]
        for j in range(i * m, (i + 1) * m):
            z = out[j]
            row += (z if z > 0 else 0) - z * T[j] + log1p(exp(-fabs(z)))
            G[j] = g_row * (sigmoid(out[j]) - T[j])
        total += w[i] * row
    return scale * total / (n * m)


cdef inline double poisson(const floating* out, const floating* T, const floating* w, floating* G,
                           Py_ssize_t n, Py_ssize_t m, double scale) noexcept nogil:
    # e^z in double, unclamped: a rate that overflows makes the loss infinite, which the
    # epoch reports as divergence
    cdef Py_ssize_t i, j
    cdef double total = 0, row, e
    cdef floating g_scale = <floating> (scale / (n * m)), g_row
    if w == NULL:
        for i in range(n * m):
            e = exp(<double> out[i])
            total += e - <double> T[i] * <double> out[i]
            G[i] = <floating> (g_scale * (e - T[i]))
        return scale * total / (n * m)
    for i in range(n):
        row = 0
        g_row = g_scale * w[i]
        for j in range(i * m, (i + 1) * m):
            e = exp(<double> out[j])
            row += e - <double> T[j] * <double> out[j]
            G[j] = <floating> (g_row * (e - T[j]))
        total += w[i] * row
    return scale * total / (n * m)


cdef inline double _l1_or_huber(floating d, floating* g, bint huber) noexcept nogil:
    """The loss of one difference d = out - T; *g = its derivative."""
    cdef double a = fabs(d)
    if huber and a <= 1:
        g[0] = d
        return 0.5 * a * a
    g[0] = 1 if d > 0 else (-1 if d < 0 else 0)     # sign(d), 0 at 0 as torch's
    return a - 0.5 if huber else a


cdef inline double robust(const floating* out, const floating* T, const floating* w, floating* G,
                          Py_ssize_t n, Py_ssize_t m, double scale, bint huber) noexcept nogil:
    # l1 and huber: the regression losses that grow linearly with large errors
    cdef Py_ssize_t i, j
    cdef double total = 0, row
    cdef floating g_scale = <floating> (scale / (n * m)), g_row
    for i in range(n):
        row = 0
        g_row = g_scale if w == NULL else g_scale * w[i]
        for j in range(i * m, (i + 1) * m):
            row += _l1_or_huber(out[j] - T[j], &G[j], huber)
            G[j] *= g_row
        total += row if w == NULL else w[i] * row
    return scale * total / (n * m)


cdef inline double loss_and_grad(int kind, const floating* out, const floating* T,
                                 const Py_ssize_t* labels, const floating* w, floating* G,
                                 Py_ssize_t n, Py_ssize_t m, double scale) noexcept nogil:
    """w: per-row weights, or NULL for none."""
    if kind == CROSS_ENTROPY:
        return cross_entropy(out, labels, w, G, n, m, scale)
    if kind == BINARY_CROSS_ENTROPY:
        return binary_cross_entropy(out, T, w, G, n, m, scale)
    if kind == POISSON:
        return poisson(out, T, w, G, n, m, scale)
    if kind == L1 or kind == HUBER:
        return robust(out, T, w, G, n, m, scale, kind == HUBER)
    return mse(out, T, w, G, n, m, scale)
