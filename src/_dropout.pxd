# Inverted dropout on raw row-major buffers.
#
#   training:   Y = X ⊙ M / (1 - p),   M_ij = [u_ij >= p]       dX = δ ⊙ M / (1 - p)
#   evaluation: Y = X
#
# The mask is never stored: u_ij is a counter-based hash of (seed, row, layer,
# column), so backward regenerates it, and each row's mask depends only on its
# position in the epoch, not on which thread computes it: a fit is the same
# with any thread count, and resumes bit for bit.
from cython cimport floating


cdef inline unsigned long long _mix(unsigned long long z) noexcept nogil:
    """splitmix64's finaliser: a bijection of 64-bit words whose outputs pass BigCrush."""
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef inline unsigned long long row_key(unsigned long long seed, long long row, long long layer) noexcept nogil:
    """The key of one row's mask in one layer: mixes the fit's seed (seed and epoch), the row's
    position and the layer."""
    return _mix(seed + 0x9e3779b97f4a7c15ULL * (<unsigned long long> row + 1)
                + 0xd1b54a32d192ed03ULL * (<unsigned long long> layer + 1))


cdef inline floating _keep(unsigned long long key, Py_ssize_t j, double p, floating scale) noexcept nogil:
    """scale when column j of the row survives (u >= p, u uniform in [0, 1) from 53 bits), else 0."""
    cdef double u = (_mix(key + <unsigned long long> j) >> 11) * (1.0 / 9007199254740992.0)
    return scale if u >= p else 0


cdef inline void dropout_rows(const floating* X, floating* Y, Py_ssize_t r0, Py_ssize_t r1,
                              Py_ssize_t n, double p, unsigned long long seed, long long row_base,
                              long long layer) noexcept nogil:
    """Y[r] = X[r] ⊙ M[r] / (1 - p) for rows r0:r1 (X and Y may be the same buffer; the
    same call with δ and dX is the backward pass); row r's mask is that of position
    row_base + r."""
    cdef Py_ssize_t i, j
    cdef unsigned long long key
    cdef floating scale = <floating> (1.0 / (1.0 - p))
    for i in range(r0, r1):
        key = row_key(seed, row_base + i, layer)
        for j in range(n):
            Y[i * n + j] = X[i * n + j] * _keep(key, j, p, scale)
