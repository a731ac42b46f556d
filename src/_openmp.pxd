# OpenMP in one place: every other module asks here how many threads exist.
# Compiles with or without -fopenmp; without it cprop runs single-threaded
# and cprop.show_config() says so (CPROP_OPENMP == 0).

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CPROP_OPENMP 1
    #define CPROP_OPENMP_VERSION _OPENMP
    /* an orphaned barrier: binds to whichever parallel region calls it */
    static inline void cprop_barrier(void) { _Pragma("omp barrier") }
    #else
    static inline void cprop_barrier(void) { }
    #define CPROP_OPENMP 0
    #define CPROP_OPENMP_VERSION 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    static void omp_set_num_threads(int n) { (void)n; }
    #endif
    """
    const int CPROP_OPENMP
    const long CPROP_OPENMP_VERSION   # the _OPENMP macro: yyyymm of the OpenMP specification
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil
    void cprop_barrier() noexcept nogil
