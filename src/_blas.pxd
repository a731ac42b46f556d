# BLAS in one place: a row-major GEMM over scipy's Cython BLAS, without the GIL.
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      floating alpha, const floating* A, int lda,
                      const floating* B, int ldb,
                      floating beta, floating* C, int ldc) noexcept nogil:
    """Row-major C := alpha * op(A)·op(B) + beta * C, with C (m×n), op(A) (m×k), op(B) (k×n).

    BLAS is column-major and a row-major matrix is the column-major storage of
    its transpose, so we ask BLAS for Cᵀ = op(B)ᵀ·op(A)ᵀ: swap A and B, m and n.
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*> B, &ldb, <float*> A, &lda,
              &beta, C, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*> B, &ldb, <double*> A, &lda,
              &beta, C, &ldc)
