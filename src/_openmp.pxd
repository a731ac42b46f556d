# OpenMP in one place: every other module asks here how many threads exist,
# and the training epoch's threads meet at cprop's own barrier, defined here.
# Compiles with or without -fopenmp; without it cprop runs single-threaded
# and cprop.show_config() says so (CPROP_OPENMP == 0).
#
# Why a barrier of cprop's own: OpenMP's `#pragma omp barrier` in libgomp spins
# for GOMP_SPINCOUNT (300,000 pauses, tens of milliseconds: benchmarks/README.md)
# before it sleeps, and that variable is read once when libgomp loads, so a
# library cannot change it. On a machine whose cores are busy with other
# processes a thread that reaches the barrier first then burns its timeslice
# waiting for a peer that is not running. cprop's barrier spins for at most
# as long as recent waits took (2-200 microseconds), not at all while a peer
# yet to arrive sits on the same CPU, then sleeps on a futex until the last
# thread wakes it.
#
# It also keeps count of how the team spent its time (time waited, CPU time
# worked, share of a CPU while runnable), which cprop/_threads.py reads after
# each epoch to decide whether the rest of the fit is better off on one thread.
#
# Use, in a parallel region: before it, cprop_barrier_init(&barrier) on a
# cprop_team_barrier shared by the team; in it, t = cprop_barrier_join(&barrier)
# as each thread starts, cprop_barrier() as often as needed, and
# cprop_barrier_leave() as each thread ends. Outside a joined region
# cprop_barrier() is OpenMP's own barrier (a no-op outside any region).

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CPROP_OPENMP 1
    #define CPROP_OPENMP_VERSION _OPENMP
    #else
    #define CPROP_OPENMP 0
    #define CPROP_OPENMP_VERSION 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_num_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    static void omp_set_num_threads(int n) { (void)n; }
    #endif

    #include <limits.h>
    #include <string.h>
    #include <time.h>
    #include <sched.h>
    #if defined(__linux__)
    #include <linux/futex.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    int sched_getcpu(void);   /* glibc's, declared by <sched.h> only with _GNU_SOURCE */
    #define CPROP_CPU() sched_getcpu()
    #else
    #define CPROP_CPU() (-1)
    #endif

    /* How long a thread that reaches the barrier spins before it sleeps adapts
       to how long waits take: on a quiet machine threads meet within tens of
       microseconds, and sleeping would add a futex wake-up to each wait; on a
       busy one a peer may be descheduled for milliseconds, and spinning only
       takes the core from whoever could use it. A wait that ends asleep
       after less than CPROP_SPIN_MAX_NS raises the budget to twice its length;
       a longer one halves it. Figures chosen by measurement (benchmarks/README.md). */
    #define CPROP_SPIN_MIN_NS 2000
    #define CPROP_SPIN_MAX_NS 200000
    #define CPROP_SPIN_START_NS 20000
    /* threads whose CPU the barrier tracks: spinning while a peer that has yet
       to arrive waits for this very CPU only delays it (on a busy machine the
       scheduler often puts two of the team on one CPU) */
    #define CPROP_TRACKED_THREADS 64

    /* A generation-counting barrier. The last thread to arrive resets the
       count and bumps the generation (the futex word); the others wait for
       the generation to change. Every field is accessed only atomically. */
    typedef struct {
        int size;             /* threads in the team */
        int arrived;          /* threads at the barrier in the current generation */
        int sleepers;         /* threads asleep (or about to be) on generation */
        int generation;       /* the futex word */
        int spin_ns;          /* how long a waiting thread spins before it sleeps */
        int cpu[CPROP_TRACKED_THREADS];   /* the CPU each thread was last seen on */
        /* the team's figures, summed over its threads, from join to leave: */
        long long waited_ns;  /* time at barriers */
        long long slept_ns;   /* time asleep at barriers (not runnable) */
        long long spun_ns;    /* time spinning at barriers */
        long long worked_ns;  /* CPU time, less spinning */
        long long present_ns; /* wall time */
    } __attribute__((aligned(64))) cprop_team_barrier;

    /* the barrier of the region this thread has joined, NULL outside one */
    static __thread cprop_team_barrier* cprop_current_barrier = NULL;
    /* this thread's CPU and wall clocks when it joined, and its spinning since */
    static __thread long long cprop_joined_cpu_ns = 0;
    static __thread long long cprop_joined_ns = 0;
    static __thread int cprop_thread_num = 0;
    static __thread long long cprop_spun_ns = 0;
    /* the last team this thread led (as thread 0), kept for cprop_take_team_stats */
    static __thread int cprop_led_size = 1;
    static __thread long long cprop_led_waited_ns = 0;
    static __thread long long cprop_led_worked_ns = 0;
    static __thread long long cprop_led_cpu_ns = 0;
    static __thread long long cprop_led_runnable_ns = 0;
    static __thread int cprop_led_spin_ns = CPROP_SPIN_START_NS;

    static inline long long cprop_clock_ns(clockid_t clock) {
        struct timespec ts;
        clock_gettime(clock, &ts);
        return (long long) ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    static inline void cprop_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }

    /* Before a region: a fresh barrier, whose spin budget starts where this
       thread's last team left it (the epochs of a fit are one region each). */
    static inline void cprop_barrier_init(cprop_team_barrier* b) {
        int t;
        memset(b, 0, sizeof *b);
        b->spin_ns = cprop_led_spin_ns;
        for (t = 0; t < CPROP_TRACKED_THREADS; t++)
            b->cpu[t] = -1;   /* not seen yet */
    }

    /* Called by every thread of a parallel region as it starts, before any
       cprop_barrier(): counts the team (every thread stores the same size, so
       whichever store a thread reads is right) and returns the thread's number. */
    static inline int cprop_barrier_join(cprop_team_barrier* b) {
        int t = omp_get_thread_num();
        __atomic_store_n(&b->size, omp_get_num_threads(), __ATOMIC_RELAXED);
        if (t < CPROP_TRACKED_THREADS)
            __atomic_store_n(&b->cpu[t], CPROP_CPU(), __ATOMIC_RELAXED);
        cprop_current_barrier = b;
        cprop_thread_num = t;
        cprop_spun_ns = 0;
        cprop_joined_cpu_ns = cprop_clock_ns(CLOCK_THREAD_CPUTIME_ID);
        cprop_joined_ns = cprop_clock_ns(CLOCK_MONOTONIC);
        return t;
    }

    /* Record this thread's CPU; whether another of the team was last seen on it. */
    static inline int cprop_cpu_shared(cprop_team_barrier* b) {
        int t = cprop_thread_num, cpu = CPROP_CPU(), u, n;
        if (cpu < 0 || t >= CPROP_TRACKED_THREADS)
            return 0;
        __atomic_store_n(&b->cpu[t], cpu, __ATOMIC_RELAXED);
        n = __atomic_load_n(&b->size, __ATOMIC_RELAXED);
        n = n < CPROP_TRACKED_THREADS ? n : CPROP_TRACKED_THREADS;
        for (u = 0; u < n; u++)
            if (u != t && __atomic_load_n(&b->cpu[u], __ATOMIC_RELAXED) == cpu)
                return 1;
        return 0;
    }

    /* Wait until b->generation differs from gen: spin until start + spin_ns,
       then sleep. Returns the time spent spinning; *slept says whether it slept. */
    static long long cprop_barrier_wait_for(cprop_team_barrier* b, int gen, long long start,
                                            long long spin_ns, int* slept) {
        long long deadline = start + spin_ns, now = start;
        unsigned int i;
        *slept = 0;
        for (i = 1; ; i++) {
            if (__atomic_load_n(&b->generation, __ATOMIC_ACQUIRE) != gen)
                return cprop_clock_ns(CLOCK_MONOTONIC) - start;
            cprop_cpu_relax();
            if (i % 16 == 0 && (now = cprop_clock_ns(CLOCK_MONOTONIC)) > deadline)
                break;
        }
        /* Announce the sleep before the last look at the generation; the
           waker bumps the generation before it looks at the sleepers. Both
           sequentially consistent: one of the two sees the other's write. */
        *slept = 1;
        __atomic_add_fetch(&b->sleepers, 1, __ATOMIC_SEQ_CST);
        while (__atomic_load_n(&b->generation, __ATOMIC_SEQ_CST) == gen) {
    #if defined(__linux__)
            /* returns at once if the word is no longer gen; spurious wake-ups loop */
            syscall(SYS_futex, &b->generation, FUTEX_WAIT_PRIVATE, gen, NULL, NULL, 0);
    #else
            struct timespec pause = {0, 20000};
            sched_yield();
            if (__atomic_load_n(&b->generation, __ATOMIC_SEQ_CST) == gen)
                nanosleep(&pause, NULL);
    #endif
        }
        /* (the load that saw the new generation was an acquire) */
        __atomic_sub_fetch(&b->sleepers, 1, __ATOMIC_RELAXED);
        return now - start;
    }

    /* Wait at b until the whole team has arrived; add the time waited to
       b->waited_ns when `record`. Also a full memory fence: whatever any
       thread wrote before it, every thread sees after it (arrivals release
       and the last arrival acquires through the arrival count; the generation
       bump releases and the waiters acquire it). */
    static inline void cprop_team_wait(cprop_team_barrier* b, int record) {
        long long start, waited, spun;
        int spin, slept, shared;
        /* this thread saw the current generation begin (it passed the last
           barrier, or none was yet), so a relaxed load reads it */
        int gen = __atomic_load_n(&b->generation, __ATOMIC_RELAXED);
        if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL)
                == __atomic_load_n(&b->size, __ATOMIC_RELAXED)) {
            if (cprop_thread_num < CPROP_TRACKED_THREADS)
                __atomic_store_n(&b->cpu[cprop_thread_num], CPROP_CPU(), __ATOMIC_RELAXED);
            __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
            __atomic_add_fetch(&b->generation, 1, __ATOMIC_SEQ_CST);
    #if defined(__linux__)
            if (__atomic_load_n(&b->sleepers, __ATOMIC_SEQ_CST) > 0)
                syscall(SYS_futex, &b->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    #endif
            return;
        }
        start = cprop_clock_ns(CLOCK_MONOTONIC);
        shared = cprop_cpu_shared(b);
        spin = shared ? 0 : __atomic_load_n(&b->spin_ns, __ATOMIC_RELAXED);
        spun = cprop_barrier_wait_for(b, gen, start, spin, &slept);
        cprop_spun_ns += spun;
        waited = cprop_clock_ns(CLOCK_MONOTONIC) - start;
        if (slept && !shared) {
            /* threads racing here may overwrite each other: any of their values will do */
            spin = waited < CPROP_SPIN_MAX_NS ? 2 * (int) waited : spin / 2;
            spin = spin < CPROP_SPIN_MIN_NS ? CPROP_SPIN_MIN_NS
                 : spin > CPROP_SPIN_MAX_NS ? CPROP_SPIN_MAX_NS : spin;
            __atomic_store_n(&b->spin_ns, spin, __ATOMIC_RELAXED);
        }
        if (record) {
            __atomic_add_fetch(&b->waited_ns, waited, __ATOMIC_RELAXED);
            if (slept)
                __atomic_add_fetch(&b->slept_ns, waited - spun, __ATOMIC_RELAXED);
        }
    }

    /* Every thread of the team waits here until all have arrived (see
       cprop_team_wait). Outside a joined region: OpenMP's own barrier. */
    static inline void cprop_barrier(void) {
        cprop_team_barrier* b = cprop_current_barrier;
        if (b == NULL) {
    #ifdef _OPENMP
            _Pragma("omp barrier")
    #endif
            return;
        }
        cprop_team_wait(b, 1);
    }

    /* Called by every thread as it leaves the region. Adds its figures to the
       team's, then meets the others at a last barrier (so that they also reach
       the barrier OpenMP puts at the region's end, which spins, together),
       after which thread 0 keeps the team's figures for cprop_take_team_stats.
       The barrier is gone after. */
    static inline void cprop_barrier_leave(void) {
        cprop_team_barrier* b = cprop_current_barrier;
        long long slept, spun, worked, present;
        if (b == NULL)
            return;
        __atomic_add_fetch(&b->worked_ns, cprop_clock_ns(CLOCK_THREAD_CPUTIME_ID)
                           - cprop_joined_cpu_ns - cprop_spun_ns, __ATOMIC_RELAXED);
        __atomic_add_fetch(&b->spun_ns, cprop_spun_ns, __ATOMIC_RELAXED);
        __atomic_add_fetch(&b->present_ns, cprop_clock_ns(CLOCK_MONOTONIC) - cprop_joined_ns,
                           __ATOMIC_RELAXED);
        cprop_team_wait(b, 0);
        if (omp_get_thread_num() == 0) {
            slept = __atomic_load_n(&b->slept_ns, __ATOMIC_RELAXED);
            spun = __atomic_load_n(&b->spun_ns, __ATOMIC_RELAXED);
            worked = __atomic_load_n(&b->worked_ns, __ATOMIC_RELAXED);
            present = __atomic_load_n(&b->present_ns, __ATOMIC_RELAXED);
            cprop_led_size = __atomic_load_n(&b->size, __ATOMIC_RELAXED);
            cprop_led_waited_ns = __atomic_load_n(&b->waited_ns, __ATOMIC_RELAXED);
            cprop_led_worked_ns = worked;
            cprop_led_cpu_ns = worked + spun;
            cprop_led_runnable_ns = present - slept;
            cprop_led_spin_ns = __atomic_load_n(&b->spin_ns, __ATOMIC_RELAXED);
        }
        cprop_current_barrier = NULL;
    }

    /* The size of the last team this thread led and, summed over its threads,
       the time they waited at barriers, the CPU time they worked (spinning not
       counted), all their CPU time, and the time they were runnable (not
       asleep at a barrier); 1 and zeros when it led none since the last call. */
    static inline int cprop_take_team_stats(long long* waited_ns, long long* worked_ns,
                                            long long* cpu_ns, long long* runnable_ns) {
        int size = cprop_led_size;
        *waited_ns = cprop_led_waited_ns;
        *worked_ns = cprop_led_worked_ns;
        *cpu_ns = cprop_led_cpu_ns;
        *runnable_ns = cprop_led_runnable_ns;
        cprop_led_size = 1;
        cprop_led_waited_ns = cprop_led_worked_ns = cprop_led_cpu_ns = cprop_led_runnable_ns = 0;
        return size;
    }
    """
    const int CPROP_OPENMP
    const long CPROP_OPENMP_VERSION   # the _OPENMP macro: yyyymm of the OpenMP specification
    ctypedef struct cprop_team_barrier:
        pass
    int omp_get_max_threads() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil
    void cprop_barrier_init(cprop_team_barrier* b) noexcept nogil
    int cprop_barrier_join(cprop_team_barrier* b) noexcept nogil
    void cprop_barrier() noexcept nogil
    void cprop_barrier_leave() noexcept nogil
    int cprop_take_team_stats(long long* waited_ns, long long* worked_ns, long long* cpu_ns,
                              long long* runnable_ns) noexcept nogil
