"""Build cprop's compiled core: Cython kernels in src/, built into the cprop package.

Environment switches:
  CPROP_NATIVE=1       add -march=native (faster, but the build then runs only on CPUs like this one)
  CPROP_BOUNDSCHECK=1  compile with Cython's bounds and wraparound checks on, for debugging
  CPROP_NO_OPENMP=1    build without OpenMP even when the compiler has it
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _compiler_has_openmp(compiler):
    """Compile and link a tiny OpenMP program; False on any failure."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "omp.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        objects = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
        compiler.link_executable(objects, os.path.join(tmp, "omp"), extra_postargs=["-fopenmp"])
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """Adds OpenMP flags when the compiler supports them; builds single-threaded otherwise."""

    def build_extensions(self):
        use_openmp = not _env_flag("CPROP_NO_OPENMP") and _compiler_has_openmp(self.compiler)
        if not use_openmp:
            print("cprop: building without OpenMP (single-threaded)", file=sys.stderr)
        for ext in self.extensions:
            if use_openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()


boundscheck = _env_flag("CPROP_BOUNDSCHECK")
directives = {
    "language_level": 3,
    "boundscheck": boundscheck,
    "wraparound": boundscheck,
    "initializedcheck": boundscheck,
    "cdivision": True,
    "embedsignature": True,
}
# -fno-trapping-math lets gcc evaluate both arms of a select (`z if z > 0 else
# slope * z`, the clamps in _exp), without which loops over activations do not
# vectorize; cprop never enables floating-point traps, and NaN/inf semantics are
# unchanged (unlike -ffast-math). -fno-math-errno: nothing reads errno.
compile_args = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
if _env_flag("CPROP_NATIVE"):
    compile_args.append("-march=native")

extensions = [
    Extension(
        "cprop._core",
        ["src/_core.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=list(compile_args),
    )
]

setup(
    ext_modules=cythonize(extensions, include_path=["src"], compiler_directives=directives),
    cmdclass={"build_ext": BuildExt},
)
