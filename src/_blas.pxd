# BLAS in one place: a row-major GEMM over the BLAS scipy's Cython BLAS calls, without the GIL.
#
# The core does not cimport scipy.linalg.cython_blas: importing that module imports all
# of scipy.linalg (benchmarks/README.md: what it costs), which every process would pay
# before its first fit. The Fortran sgemm_/dgemm_ that cython_blas wraps are bound at
# import instead (_bind_blas in _core.pyx, through cprop_bind_gemm): looked up in the
# shared library cython_blas links to, without running any Python, or, where that cannot
# be done, read from cython_blas's exported C functions.
from cython cimport floating

cdef extern from *:
    """
    typedef void (*cprop_sgemm_t)(const char*, const char*, const int*, const int*, const int*,
                                  const float*, const float*, const int*, const float*,
                                  const int*, const float*, float*, const int*);
    typedef void (*cprop_dgemm_t)(const char*, const char*, const int*, const int*, const int*,
                                  const double*, const double*, const int*, const double*,
                                  const int*, const double*, double*, const int*);
    static cprop_sgemm_t cprop_sgemm = 0;
    static cprop_dgemm_t cprop_dgemm = 0;
    /* where every product's sgemm and dgemm are: set once, as the core loads */
    static void cprop_bind_gemm(void* sgemm, void* dgemm) {
        cprop_sgemm = (cprop_sgemm_t) sgemm;
        cprop_dgemm = (cprop_dgemm_t) dgemm;
    }

    #if defined(_WIN32)
    static void* cprop_dlsym(const char* library, const char* name) { return 0; }
    #else
    #include <dlfcn.h>
    /* `name` from the shared library at `library` and what it links to (loaded if it
       was not; its Python module, if it is one, is not initialised), or NULL. */
    static void* cprop_dlsym(const char* library, const char* name) {
        void* handle = dlopen(library, RTLD_LAZY | RTLD_LOCAL);
        return handle ? dlsym(handle, name) : 0;
    }
    #endif
    """
    ctypedef void (*cprop_sgemm_t)(const char*, const char*, const int*, const int*, const int*,
                                   const float*, const float*, const int*, const float*,
                                   const int*, const float*, float*, const int*) noexcept nogil
    ctypedef void (*cprop_dgemm_t)(const char*, const char*, const int*, const int*, const int*,
                                   const double*, const double*, const int*, const double*,
                                   const int*, const double*, double*, const int*) noexcept nogil
    cprop_sgemm_t cprop_sgemm
    cprop_dgemm_t cprop_dgemm
    void cprop_bind_gemm(void* sgemm, void* dgemm)
    void* cprop_dlsym(const char* library, const char* name)


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
        cprop_sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*> B, &ldb, <float*> A, &lda,
                    &beta, C, &ldc)
    else:
        cprop_dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*> B, &ldb, <double*> A, &lda,
                    &beta, C, &ldc)
