# MPI in one place: MPI_Allreduce, bound at run time from the library mpi4py loaded.
#
# cprop builds without MPI headers and without mpi4py: MPI is optional. When a fit runs
# under comm, mpi4py has already loaded its MPI module and, through it, libmpi; the
# distributed epoch (train_epoch_mpi in _core.pyx) then looks MPI_Allreduce up in that
# module's dependencies (dlopen with RTLD_NOLOAD: nothing new is loaded) and calls it
# without the GIL. _bind_mpi in _core.pyx is the one caller of cprop_bind_mpi, and checks
# the function on a tiny allreduce before any fit relies on it.
#
# Handles (communicator, datatype, operation, MPI_IN_PLACE) are not compiled in: they
# come from mpi4py at run time as integers (MPI._handleof, int(MPI.IN_PLACE)), because
# their C types differ between MPI libraries: pointers in Open MPI, 32-bit ints in MPICH.
# They are passed as intptr_t, which works for both on the x86-64 System V and AArch64
# procedure-call standards: MPI_Allreduce's six arguments all travel in integer
# registers (rdi..r9; x0..x5), one per argument whatever its width, and a callee that
# takes an int reads only the register's low 32 bits, which hold the int's value. (On
# an ABI that passes arguments on the stack by their declared width this would not
# hold; the check in _bind_mpi then fails and training stays on mpi4py's allreduce.)
from libc.stdint cimport intptr_t

cdef extern from *:
    """
    #include <stdint.h>
    typedef int (*cprop_allreduce_t)(intptr_t sendbuf, void* recvbuf, int count,
                                     intptr_t datatype, intptr_t op, intptr_t comm);
    static cprop_allreduce_t cprop_mpi_allreduce = 0;

    #if defined(_WIN32)
    static int cprop_bind_mpi(const char* module) { return 0; }
    #else
    #include <dlfcn.h>
    /* Bind MPI_Allreduce from the already loaded shared library at `module` (mpi4py's
       MPI extension; dlsym on its handle searches what it links to, libmpi) or, failing
       that, from the libraries loaded globally. Returns whether it was found. */
    static int cprop_bind_mpi(const char* module) {
        void* handle = dlopen(module, RTLD_NOW | RTLD_NOLOAD);
        void* f = handle ? dlsym(handle, "MPI_Allreduce") : 0;
        if (!f)
            f = dlsym(RTLD_DEFAULT, "MPI_Allreduce");
        cprop_mpi_allreduce = (cprop_allreduce_t) f;
        return f != 0;
    }
    #endif
    """
    ctypedef int (*cprop_allreduce_t)(intptr_t sendbuf, void* recvbuf, int count, intptr_t datatype,
                                      intptr_t op, intptr_t comm) noexcept nogil
    cprop_allreduce_t cprop_mpi_allreduce
    int cprop_bind_mpi(const char* module)


cdef struct MpiSum:
    # what an in-place sum over a communicator's ranks needs, from mpi4py's handles
    intptr_t comm, datatype, op, in_place


cdef inline int allreduce_sum(const MpiSum* s, void* buf, int count) noexcept nogil:
    """buf[0:count] := Σ over the ranks of buf[0:count] (in place); MPI's error code, 0 on success."""
    return cprop_mpi_allreduce(s.in_place, buf, count, s.datatype, s.op, s.comm)
