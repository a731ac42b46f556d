# Normalization layers on raw row-major buffers (n columns), then an activation.
#
#   x̂ = (x - μ) · rstd,  rstd = 1/√(σ² + ε),   z = γ ⊙ x̂ + β,   y = f(z)
#   LayerNorm: μ, σ² over each row's n features (row-local)
#   BatchNorm: μ, σ² over the batch's rows for each feature (training; biased σ²),
#              or the running estimates (evaluation; updated with the unbiased σ²)
#   backward, from δ = ∂L/∂z:  dx̂ = δ ⊙ γ
#     LayerNorm: dx = rstd · (dx̂ - mean_row(dx̂) - x̂ · mean_row(dx̂ ⊙ x̂))
#     BatchNorm: dx = rstd · (dx̂ - mean_batch(dx̂) - x̂ · mean_batch(dx̂ ⊙ x̂))
#   dγ = Σ_rows δ ⊙ x̂,   dβ = Σ_rows δ
# γ and β are NULL when the layer has no affine parameters (γ = 1, β = 0).
from cython cimport floating
from libc.math cimport isfinite, sqrt
from _activations cimport apply_activation


cdef inline void _affine_activation(const floating* xhat, floating* Z, floating* Y, Py_ssize_t n,
                                    const floating* gamma, const floating* beta,
                                    int activation, floating alpha) noexcept nogil:
    """Y = f(γ ⊙ x̂ + β) for one row; Z (when not NULL) keeps γ ⊙ x̂ + β."""
    cdef Py_ssize_t j
    cdef floating* z = Z if Z != NULL else Y
    if gamma != NULL:
        for j in range(n):
            z[j] = gamma[j] * xhat[j] + beta[j]
    else:
        for j in range(n):
            z[j] = xhat[j]
    apply_activation(z, Y, n, activation, alpha)


cdef inline void layernorm_forward_rows(const floating* X, floating* Y, floating* Xhat, floating* Z,
                                        floating* rstd_out, const floating* gamma, const floating* beta,
                                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n, double eps,
                                        int activation, floating alpha) noexcept nogil:
    """Rows r0:r1: x̂ (into Xhat) and rstd (one per row, into rstd_out; both may be NULL in
    evaluation, where only Y is written, x̂ then going through Y)."""
    cdef Py_ssize_t i, j
    cdef double mean, var, d
    cdef floating r
    cdef const floating* x
    cdef floating* xh
    for i in range(r0, r1):
        x = X + i * n
        xh = (Xhat if Xhat != NULL else Y) + i * n
        mean = 0
        for j in range(n):
            mean += x[j]
        mean /= n
        var = 0
        for j in range(n):
            d = x[j] - mean
            var += d * d
        r = <floating> (1.0 / sqrt(var / n + eps))
        if rstd_out != NULL:
            rstd_out[i] = r
        for j in range(n):
            xh[j] = (x[j] - <floating> mean) * r
        _affine_activation(xh, NULL if Z == NULL else Z + i * n, Y + i * n, n, gamma, beta,
                           activation, alpha)


cdef inline void layernorm_backward_rows(const floating* delta, const floating* Xhat,
                                         const floating* rstd, const floating* gamma, floating* dX,
                                         Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n) noexcept nogil:
    """dX[r] for rows r0:r1 from δ = ∂L/∂z (dX may not alias δ)."""
    cdef Py_ssize_t i, j
    cdef double s1, s2
    cdef floating g, m1, m2
    cdef const floating* d
    cdef const floating* xh
    cdef floating* dx
    for i in range(r0, r1):
        d = delta + i * n
        xh = Xhat + i * n
        dx = dX + i * n
        s1 = 0
        s2 = 0
        for j in range(n):
            g = d[j] * (gamma[j] if gamma != NULL else 1)
            dx[j] = g                              # dx̂, finished below
            s1 += g
            s2 += g * xh[j]
        m1 = <floating> (s1 / n)
        m2 = <floating> (s2 / n)
        for j in range(n):
            dx[j] = rstd[i] * (dx[j] - m1 - xh[j] * m2)


cdef inline void batchnorm_stats_cols(const floating* X, floating* mean, floating* rstd,
                                      floating* running_mean, floating* running_var,
                                      Py_ssize_t bs, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1,
                                      double eps, double momentum) noexcept nogil:
    """Batch mean and rstd of columns c0:c1 over all bs rows (two passes, in double), and the
    running estimates moved towards them: r = (1 - momentum)·r + momentum·batch value,
    with the unbiased variance (as torch). An estimate whose new value is not finite (a
    batch of finite inputs whose mean or variance overflows) keeps its old one, as the
    optimizer's updates do: the model stays usable for evaluation, and saveable."""
    cdef Py_ssize_t i, j
    cdef double m, v, d
    cdef floating r_mean, r_var
    for j in range(c0, c1):
        m = 0
        for i in range(bs):
            m += X[i * n + j]
        m /= bs
        v = 0
        for i in range(bs):
            d = X[i * n + j] - m
            v += d * d
        mean[j] = <floating> m
        rstd[j] = <floating> (1.0 / sqrt(v / bs + eps))
        r_mean = <floating> ((1 - momentum) * running_mean[j] + momentum * m)
        r_var = <floating> ((1 - momentum) * running_var[j] + momentum * (v / (bs - 1) if bs > 1 else v))
        if isfinite(r_mean):
            running_mean[j] = r_mean
        if isfinite(r_var):
            running_var[j] = r_var


cdef inline void batchnorm_forward_rows(const floating* X, floating* Y, floating* Xhat, floating* Z,
                                        const floating* mean, const floating* rstd,
                                        const floating* gamma, const floating* beta,
                                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t n,
                                        int activation, floating alpha) noexcept nogil:
    """Rows r0:r1: x̂ = (x - mean)·rstd (into Xhat, or through Y when Xhat is NULL), y = f(γx̂ + β)."""
    cdef Py_ssize_t i, j
    cdef floating* xh
    for i in range(r0, r1):
        xh = (Xhat if Xhat != NULL else Y) + i * n
        for j in range(n):
            xh[j] = (X[i * n + j] - mean[j]) * rstd[j]
        _affine_activation(xh, NULL if Z == NULL else Z + i * n, Y + i * n, n, gamma, beta,
                           activation, alpha)


cdef inline void batchnorm_eval_stats(const floating* running_mean, const floating* running_var,
                                      floating* mean, floating* rstd, Py_ssize_t n,
                                      double eps) noexcept nogil:
    """The evaluation-mode mean and rstd from the running estimates."""
    cdef Py_ssize_t j
    for j in range(n):
        mean[j] = running_mean[j]
        rstd[j] = <floating> (1.0 / sqrt(<double> running_var[j] + eps))


cdef inline void batchnorm_grad_sums_cols(const floating* delta, const floating* Xhat,
                                          const floating* gamma, floating* sum_dxhat,
                                          floating* sum_dxhat_xhat, Py_ssize_t bs, Py_ssize_t n,
                                          Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Σ_rows dx̂ and Σ_rows dx̂ ⊙ x̂ for columns c0:c1, dx̂ = δ ⊙ γ."""
    cdef Py_ssize_t i, j
    cdef double s1, s2, g
    for j in range(c0, c1):
        s1 = 0
        s2 = 0
        for i in range(bs):
            g = delta[i * n + j] * (gamma[j] if gamma != NULL else 1)
            s1 += g
            s2 += g * Xhat[i * n + j]
        sum_dxhat[j] = <floating> s1
        sum_dxhat_xhat[j] = <floating> s2


cdef inline void batchnorm_backward_rows(const floating* delta, const floating* Xhat,
                                         const floating* rstd, const floating* gamma,
                                         const floating* sum_dxhat, const floating* sum_dxhat_xhat,
                                         floating* dX, Py_ssize_t bs, Py_ssize_t r0, Py_ssize_t r1,
                                         Py_ssize_t n) noexcept nogil:
    """dX[r] for rows r0:r1 (training mode), from the batch sums above."""
    cdef Py_ssize_t i, j
    cdef floating inv = <floating> (1.0 / bs), g
    for i in range(r0, r1):
        for j in range(n):
            g = delta[i * n + j] * (gamma[j] if gamma != NULL else 1)
            dX[i * n + j] = rstd[j] * (g - sum_dxhat[j] * inv - Xhat[i * n + j] * sum_dxhat_xhat[j] * inv)


cdef inline void affine_param_grads_cols(const floating* delta, const floating* Xhat,
                                         floating* dgamma, floating* dbeta, Py_ssize_t bs,
                                         Py_ssize_t n, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """dγ[c0:c1] = Σ_rows δ ⊙ x̂ and dβ[c0:c1] = Σ_rows δ."""
    cdef Py_ssize_t i, j
    for j in range(c0, c1):
        dgamma[j] = 0
        dbeta[j] = 0
    for i in range(bs):
        for j in range(c0, c1):
            dgamma[j] += delta[i * n + j] * Xhat[i * n + j]
            dbeta[j] += delta[i * n + j]
