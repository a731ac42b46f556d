# Activations in one place: the forward map y = f(z) fused with the bias add,
# and the derivative written in terms of the output y (as scikit-learn does),
# so the backward pass needs only the stored activations, not z.
# A new activation is one code below, one branch in each function, and one
# line in cprop/activations.py.
#
# e^x, σ and tanh are computed here rather than by libm: libm's scalar calls
# keep the loops over a layer's outputs from vectorizing, and made a tanh or
# logistic network train markedly slower than a relu one (benchmarks/README.md).
# The functions below are branch-free (selects, not jumps), so gcc vectorizes the
# loops that call them; they keep NaN as NaN, so divergence is still detected.
from cython cimport floating
from libc.math cimport fabs, fabsf, copysign, copysignf, erf, erff, expm1, expm1f, log1p, log1pf

cdef extern from *:
    """
    #include <stdint.h>
    /* 2^k for an integer k in the normal range, assembled from its exponent bits */
    static inline float cprop_pow2f(int32_t k) {
        union { int32_t i; float f; } u; u.i = (k + 127) << 23; return u.f;
    }
    static inline double cprop_pow2(int32_t k) {
        union { int64_t i; double f; } u; u.i = (int64_t) (k + 1023) << 52; return u.f;
    }
    """
    float cprop_pow2f(int k) noexcept nogil
    double cprop_pow2(int k) noexcept nogil

cdef enum:
    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2      # slope alpha for z < 0 (alpha >= 0; torch's default 0.01)
    SIGMOID = 3
    TANH = 4
    ELU = 5             # z if z > 0 else e^z - 1 (alpha 1, as torch's default)
    SOFTPLUS = 6        # log(1 + e^z), as torch's Softplus(beta=1, threshold=20)
    GELU = 7            # z·Φ(z), exact (erf)
    GELU_TANH = 8       # z·½(1 + tanh(√(2/π)(z + 0.044715 z³))), torch's approximate="tanh"
    SILU = 9            # z·σ(z)
    N_ACTIVATIONS = 10


cdef inline bint needs_z(int activation) noexcept nogil:
    """Whether f'(z) cannot be written through y = f(z): the pre-activation must be kept."""
    return activation == GELU or activation == GELU_TANH or activation == SILU


cdef inline floating _exp(floating x) noexcept nogil:
    """e^x to within 2 ulp; x beyond the finite range is clamped to it (e^x stays finite, > 0).

    x = k·ln2 + r with k = round(x/ln2), |r| ≤ ln2/2;  e^x = 2^k · e^r, and
    e^r by its Taylor series, whose first omitted term is below one ulp
    (r⁸/8! < 6e-9 in float, r¹⁴/14! < 5e-18 in double). ln2 is split in a
    high part exact in k·ln2_hi and a low correction (Cody and Waite).
    Every constant is of x's own type, so float loops stay in float lanes.
    """
    cdef floating k, r, one = 1
    # round(x/ln2) by adding and removing 1.5·2^(mantissa bits): the sum has no
    # fraction bits left, so the FPU rounds it to an integer
    cdef floating shift = <floating> (12582912.0 if floating is float else 6755399441055744.0)
    cdef floating lo = <floating> (-87.0 if floating is float else -708.0)
    cdef floating hi = <floating> (88.0 if floating is float else 709.0)
    x = lo if x < lo else x    # NaN fails both tests and stays NaN
    x = hi if x > hi else x
    k = (x * <floating> 1.44269504088896341 + shift) - shift
    if floating is float:
        r = (x - k * <float> 0.693359375) + k * <float> 2.12194440e-4
        return cprop_pow2f(<int> k) * (one + r * (one + r * (<float> (1 / 2.0) + r * (
            <float> (1 / 6.0) + r * (<float> (1 / 24.0) + r * (<float> (1 / 120.0) + r * (
                <float> (1 / 720.0) + r * <float> (1 / 5040.0))))))))
    else:
        r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
        return cprop_pow2(<int> k) * (1 + r * (1 + r * (1 / 2.0 + r * (1 / 6.0 + r * (
            1 / 24.0 + r * (1 / 120.0 + r * (1 / 720.0 + r * (1 / 5040.0 + r * (
                1 / 40320.0 + r * (1 / 362880.0 + r * (1 / 3628800.0 + r * (
                    1 / 39916800.0 + r * (1 / 479001600.0 + r * (1 / 6227020800.0))))))))))))))


cdef inline floating _abs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


cdef inline floating sigmoid(floating z) noexcept nogil:
    """σ(z) = 1 / (1 + e^-z), as e^-|z| based forms that cannot overflow for either sign."""
    cdef floating one = 1, zero = 0
    cdef floating e = _exp(-_abs(z))
    cdef floating s = one / (one + e)
    return s if z >= zero else e * s


cdef inline floating _tanh(floating z) noexcept nogil:
    """tanh z = sign(z)·(1 - e)/(1 + e), e = e^-2|z|; near 0, where 1 - e cancels,
    its odd Taylor series instead (first omitted term below one ulp for |z| < 1/8)."""
    cdef floating one = 1, a = _abs(z), z2 = z * z, series
    cdef floating e = _exp(-(a + a))
    cdef floating t = (one - e) / (one + e)
    if floating is float:
        t = copysignf(t, z)
        series = z * (one + z2 * (<float> (-1 / 3.0) + z2 * (<float> (2 / 15.0) + z2 * <float> (-17 / 315.0))))
    else:
        t = copysign(t, z)
        series = z * (1 + z2 * (-1 / 3.0 + z2 * (2 / 15.0 + z2 * (-17 / 315.0 + z2 * (
            62 / 2835.0 + z2 * (-1382 / 155925.0 + z2 * (21844 / 6081075.0 + z2 * (
                -929569 / 638512875.0))))))))
    return series if a < <floating> 0.125 else t


cdef inline floating _softplus(floating z) noexcept nogil:
    """log(1 + e^z) = max(z, 0) + log(1 + e^-|z|); z itself above torch's threshold 20."""
    cdef floating zero = 0
    cdef floating e = _exp(-_abs(z))
    cdef floating lp = log1pf(e) if floating is float else log1p(e)
    cdef floating y = (z if z > zero else zero) + lp
    return z if z > <floating> 20 else y


cdef inline floating _gelu(floating z) noexcept nogil:
    """z·Φ(z) = z·½(1 + erf(z/√2))."""
    cdef floating half = <floating> 0.5, r = <floating> 0.70710678118654752440
    if floating is float:
        return half * z * (1 + erff(z * r))
    else:
        return half * z * (1 + erf(z * r))


cdef inline floating _gelu_tanh(floating z) noexcept nogil:
    cdef floating k = <floating> 0.79788456080286535588, c = <floating> 0.044715, half = <floating> 0.5
    return half * z * (1 + _tanh(k * (z + c * z * z * z)))


cdef inline floating activate(floating z, int activation, floating alpha) noexcept nogil:
    """y = f(z) for one value (the elementwise loops below inline it per activation)."""
    cdef floating one = 1
    if activation == RELU:
        return z if z > 0 else 0
    if activation == LEAKY_RELU:
        return z if z > 0 else alpha * z
    if activation == SIGMOID:
        return sigmoid(z)
    if activation == TANH:
        return _tanh(z)
    if activation == ELU:
        return z if z > 0 else _exp(z) - one
    if activation == SOFTPLUS:
        return _softplus(z)
    if activation == GELU:
        return _gelu(z)
    if activation == GELU_TANH:
        return _gelu_tanh(z)
    if activation == SILU:
        return z * sigmoid(z)
    return z


cdef inline floating derivative(floating y, floating z, int activation, floating alpha) noexcept nogil:
    """f'(z), through y = f(z) where that is enough, else through z (see needs_z)."""
    cdef floating one = 1, half = <floating> 0.5, s, t, k, c
    if activation == RELU:
        return one if y > 0 else 0
    if activation == LEAKY_RELU:
        return one if y > 0 else alpha
    if activation == SIGMOID:
        return y * (one - y)
    if activation == TANH:
        return one - y * y
    if activation == ELU:                 # e^z = y + 1 for z <= 0
        return one if y > 0 else y + one
    if activation == SOFTPLUS:            # σ(z) = 1 - e^-y
        return -(expm1f(-y) if floating is float else expm1(-y))
    if activation == GELU:                # Φ(z) + z·φ(z)
        return (half * (one + (erff(z * <float> 0.70710678118654752440) if floating is float
                               else erf(z * 0.70710678118654752440)))
                + z * <floating> 0.39894228040143267794 * _exp(-half * z * z))
    if activation == GELU_TANH:
        k = <floating> 0.79788456080286535588
        c = <floating> 0.044715
        t = _tanh(k * (z + c * z * z * z))
        return half * (one + t) + half * z * (one - t * t) * k * (one + 3 * c * z * z)
    if activation == SILU:                # σ(z)(1 + z(1 - σ(z)))
        s = sigmoid(z)
        return s * (one + z * (one - s))
    return one


cdef inline void apply_activation(const floating* Z, floating* Y, Py_ssize_t n,
                                  int activation, floating alpha) noexcept nogil:
    """Y[i] = f(Z[i]) for n values; Y may be Z."""
    cdef Py_ssize_t i
    cdef floating z
    if activation == RELU:
        for i in range(n):
            z = Z[i]
            Y[i] = z if z > 0 else 0
    elif activation == LEAKY_RELU:
        for i in range(n):
            z = Z[i]
            Y[i] = z if z > 0 else alpha * z
    elif activation == SIGMOID:
        for i in range(n):
            Y[i] = sigmoid(Z[i])
    elif activation == TANH:
        for i in range(n):
            Y[i] = _tanh(Z[i])
    elif activation != IDENTITY:
        for i in range(n):
            Y[i] = activate(Z[i], activation, alpha)
    elif Y != Z:
        for i in range(n):
            Y[i] = Z[i]


cdef inline void bias_activation(floating* Z, const floating* b,
                                 Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t ldz,
                                 int activation, floating alpha, floating* Y=NULL) noexcept nogil:
    """Z[i, j] := f(Z[i, j] + b[j]), in place, one pass; row i of Z starts at Z + i·ldz.
    With Y (same layout), for the activations whose derivative needs z: Z[i, j] += b[j]
    is kept and Y[i, j] = f(Z[i, j]) written beside it."""
    cdef Py_ssize_t i, j
    cdef floating z
    cdef floating* row
    for i in range(n_rows):
        row = Z + i * ldz
        if Y != NULL:
            for j in range(n_cols):
                row[j] = row[j] + b[j]
            apply_activation(row, Y + i * ldz, n_cols, activation, alpha)
        elif activation == RELU:
            for j in range(n_cols):
                z = row[j] + b[j]
                row[j] = z if z > 0 else 0
        elif activation == LEAKY_RELU:
            for j in range(n_cols):
                z = row[j] + b[j]
                row[j] = z if z > 0 else alpha * z
        elif activation == SIGMOID:
            for j in range(n_cols):
                row[j] = sigmoid(row[j] + b[j])
        elif activation == TANH:
            for j in range(n_cols):
                row[j] = _tanh(row[j] + b[j])
        elif activation != IDENTITY:
            for j in range(n_cols):
                row[j] = activate(row[j] + b[j], activation, alpha)
        else:
            for j in range(n_cols):
                row[j] = row[j] + b[j]


cdef inline void activation_grad(const floating* G, const floating* Y, floating* delta,
                                 Py_ssize_t n, int activation, floating alpha=0,
                                 const floating* Z=NULL) noexcept nogil:
    """δ := G ⊙ f'(z), with f'(z) written through y = f(z), or through the kept
    pre-activation Z for the activations that need it; G and δ may alias."""
    cdef Py_ssize_t i
    if activation == RELU:
        for i in range(n):
            delta[i] = G[i] if Y[i] > 0 else 0
    elif activation == LEAKY_RELU:
        for i in range(n):
            delta[i] = G[i] if Y[i] > 0 else alpha * G[i]
    elif activation == SIGMOID:
        for i in range(n):
            delta[i] = G[i] * Y[i] * (1 - Y[i])
    elif activation == TANH:
        for i in range(n):
            delta[i] = G[i] * (1 - Y[i] * Y[i])
    elif activation != IDENTITY:
        if Z == NULL:
            for i in range(n):
                delta[i] = G[i] * derivative(Y[i], Y[i], activation, alpha)
        else:
            for i in range(n):
                delta[i] = G[i] * derivative(Y[i], Z[i], activation, alpha)
    elif G != delta:
        for i in range(n):
            delta[i] = G[i]
