# Activations in one place: the forward map y = f(z) fused with the bias add,
# and the derivative written in terms of the output y (as scikit-learn does),
# so the backward pass needs only the stored activations, not z.
# A new activation is one code below, one branch in each function, and one
# line in cprop/activations.py.
from cython cimport floating
from libc.math cimport exp, expf, tanh, tanhf

cdef enum:
    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2
    SIGMOID = 3
    TANH = 4

cdef enum:
    LEAKY_SLOPE_PERMILLE = 10   # leaky_relu slope 0.01, as torch's default


cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)


cdef inline floating sigmoid(floating z) noexcept nogil:
    """σ(z) = 1 / (1 + e^-z), evaluated without overflow for either sign."""
    cdef floating e
    if z >= 0:
        return 1 / (1 + _exp(-z))
    e = _exp(z)
    return e / (1 + e)


cdef inline void bias_activation(floating* Z, const floating* b,
                                 Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t ldz,
                                 int activation) noexcept nogil:
    """Z[i, j] := f(Z[i, j] + b[j]), in place, one pass; row i of Z starts at Z + i·ldz."""
    cdef Py_ssize_t i, j
    cdef floating z
    cdef floating* row
    cdef floating slope = <floating> LEAKY_SLOPE_PERMILLE / 1000
    for i in range(n_rows):
        row = Z + i * ldz
        if activation == RELU:
            for j in range(n_cols):
                z = row[j] + b[j]
                row[j] = z if z > 0 else 0
        elif activation == LEAKY_RELU:
            for j in range(n_cols):
                z = row[j] + b[j]
                row[j] = z if z > 0 else slope * z
        elif activation == SIGMOID:
            for j in range(n_cols):
                row[j] = sigmoid(row[j] + b[j])
        elif activation == TANH:
            for j in range(n_cols):
                if floating is float:
                    row[j] = tanhf(row[j] + b[j])
                else:
                    row[j] = tanh(row[j] + b[j])
        else:
            for j in range(n_cols):
                row[j] = row[j] + b[j]


cdef inline void activation_grad(const floating* G, const floating* Y, floating* delta,
                                 Py_ssize_t n, int activation) noexcept nogil:
    """δ := G ⊙ f'(z), with f'(z) written through y = f(z); G and δ may alias."""
    cdef Py_ssize_t i
    cdef floating slope = <floating> LEAKY_SLOPE_PERMILLE / 1000
    if activation == RELU:
        for i in range(n):
            delta[i] = G[i] if Y[i] > 0 else 0
    elif activation == LEAKY_RELU:
        for i in range(n):
            delta[i] = G[i] if Y[i] > 0 else slope * G[i]
    elif activation == SIGMOID:
        for i in range(n):
            delta[i] = G[i] * Y[i] * (1 - Y[i])
    elif activation == TANH:
        for i in range(n):
            delta[i] = G[i] * (1 - Y[i] * Y[i])
    elif G != delta:
        for i in range(n):
            delta[i] = G[i]
