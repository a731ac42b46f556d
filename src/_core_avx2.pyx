# cprop's compiled core a second time, for CPUs with AVX2 and FMA (x86-64-v3):
# the same source, which setup.py compiles with -march=x86-64-v3 so that the
# elementwise loops (activations, losses, optimizer updates) use 256-bit
# vectors; cprop/_lazy.py imports it instead of _core on such CPUs. The
# products are OpenBLAS's, which picks its own kernels at run time either way.
include "_core.pyx"
