# The floating-point environment of a compiled pass, in one place.
#
# Why: a parameter whose gradient stays 0 (a dead relu unit, an input column that
# is always 0, as mnist's border pixels) has its momentum decay geometrically,
# v ← μ·v, into the subnormal range, and there it stays: μ times the smallest
# subnormal rounds back to the smallest subnormal. On Intel cores every
# arithmetic instruction with a subnormal operand or result then takes a
# microcode assist of ~100+ cycles; measured here (benchmarks/README.md) it made
# the tiny workload's epoch 3.3× slower once half its momentum buffer was
# subnormal. So, as XLA (JAX) and oneDNN run, every pass over a network runs with
# subnormals flushed to zero (x86 MXCSR's FTZ and DAZ bits; aarch64's FPCR.FZ)
# unless cprop.set_flush_denormals(False) asked for IEEE gradual underflow. Either
# way the pass sets the mode it runs in (a caller that flushes, or OpenMP workers
# born from one, do not leak their mode into cprop's results). The thread's own
# mode is restored as each pass ends, so NumPy and the rest of the process never
# see cprop's.
#
# Use, in every thread of a pass: saved = cprop_fp_enter() as it starts,
# cprop_fp_leave(saved) as it ends.

cdef extern from *:
    """
    #if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    #include <xmmintrin.h>
    #define CPROP_FLUSH_SUPPORTED 1
    #define CPROP_MXCSR_FTZ_DAZ 0x8040u   /* flush-to-zero (bit 15), denormals-are-zero (bit 6) */
    static inline unsigned long long cprop_fp_mode(void) { return _mm_getcsr(); }
    static inline void cprop_fp_set_mode(unsigned long long m) { _mm_setcsr((unsigned int) m); }
    static inline unsigned long long cprop_fp_with_flush(unsigned long long m, int flush) {
        return flush ? m | CPROP_MXCSR_FTZ_DAZ : m & ~(unsigned long long) CPROP_MXCSR_FTZ_DAZ;
    }
    #elif defined(__aarch64__)
    #define CPROP_FLUSH_SUPPORTED 1
    static inline unsigned long long cprop_fp_mode(void) {
        unsigned long long m; __asm__ __volatile__("mrs %0, fpcr" : "=r"(m)); return m;
    }
    static inline void cprop_fp_set_mode(unsigned long long m) {
        __asm__ __volatile__("msr fpcr, %0" : : "r"(m));
    }
    static inline unsigned long long cprop_fp_with_flush(unsigned long long m, int flush) {
        return flush ? m | (1ull << 24) : m & ~(1ull << 24);   /* FPCR.FZ */
    }
    #else
    #define CPROP_FLUSH_SUPPORTED 0
    static inline unsigned long long cprop_fp_mode(void) { return 0; }
    static inline void cprop_fp_set_mode(unsigned long long m) { (void) m; }
    static inline unsigned long long cprop_fp_with_flush(unsigned long long m, int flush) {
        (void) flush; return m;
    }
    #endif

    /* the process's choice (cprop.set_flush_denormals), read as each pass starts */
    static int cprop_flush_denormals = CPROP_FLUSH_SUPPORTED;
    static void cprop_set_flush_denormals(int flush) {
        cprop_flush_denormals = flush && CPROP_FLUSH_SUPPORTED;
    }
    static int cprop_get_flush_denormals(void) { return cprop_flush_denormals; }

    static inline unsigned long long cprop_fp_enter(void) {
        unsigned long long saved = cprop_fp_mode();
        unsigned long long mode = cprop_fp_with_flush(saved, cprop_flush_denormals);
        if (mode != saved) cprop_fp_set_mode(mode);
        return saved;
    }
    static inline void cprop_fp_leave(unsigned long long saved) { cprop_fp_set_mode(saved); }
    """
    const int CPROP_FLUSH_SUPPORTED
    void cprop_set_flush_denormals(int flush) noexcept nogil
    int cprop_get_flush_denormals() noexcept nogil
    unsigned long long cprop_fp_enter() noexcept nogil
    void cprop_fp_leave(unsigned long long saved) noexcept nogil
