"""Build cprop's compiled core: Cython kernels in src/, built into the cprop package.

Environment switches:
  CPROP_NATIVE=1       add -march=native (faster, but the build then runs only on CPUs like this one)
  CPROP_BOUNDSCHECK=1  compile with Cython's bounds and wraparound checks on, for debugging
  CPROP_NO_OPENMP=1    build without OpenMP even when the compiler has it
  CPROP_NO_AVX2=1      skip the second, AVX2/FMA build of the core (x86-64 only; chosen at import)

The generated C is reused while cprop's own sources, the directives, the compiler
flags and the Cython/numpy/scipy versions are unchanged (a fingerprint in
build/), so `pip install .` followed by `pip install ".[test]"` compiles once:
pip's fresh build environment would otherwise make scipy's .pxd files look newer.

A build from a source checkout (``pip install .`` in the repository root) also
copies the compiled modules into the checkout's ``cprop/`` folder: ``python -m
cprop`` or ``python -m pytest`` run from the root put the root first on
sys.path, and the checkout's ``cprop/`` then shadows the installed package, so
it must be importable too. (An sdist's build copies them into its own
temporary tree, which is harmless.)
"""
import glob
import json
import os
import platform
import shutil
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _compiler_accepts(compiler, source, flags):
    """Compile and link a tiny program with `flags`; False on any failure."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compiler_has_openmp(compiler):
    return _compiler_accepts(
        compiler, "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n",
        ["-fopenmp"])


class BuildExt(build_ext):
    """Adds OpenMP flags when the compiler supports them; builds single-threaded otherwise."""

    def build_extensions(self):
        use_openmp = not _env_flag("CPROP_NO_OPENMP") and _compiler_has_openmp(self.compiler)
        if not use_openmp:
            print("cprop: building without OpenMP (single-threaded)", file=sys.stderr)
        if any(ext.name == AVX2_MODULE for ext in self.extensions) and not _compiler_accepts(
                self.compiler, "int main(void) { return 0; }\n", AVX2_FLAGS):
            print(f"cprop: the compiler does not take {AVX2_FLAGS}: building the baseline core only",
                  file=sys.stderr)
            self.extensions = [ext for ext in self.extensions if ext.name != AVX2_MODULE]
        for ext in self.extensions:
            if use_openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        super().build_extensions()

    def run(self):
        super().run()
        if not self.inplace:
            self._copy_into_source_tree()

    def _copy_into_source_tree(self):
        """Put each built module beside its package's sources, atomically (a running
        process keeps the old file's inode); a read-only tree is skipped with a note."""
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            package_dir = os.path.join(HERE, *ext.name.split(".")[:-1])
            target = os.path.join(package_dir, os.path.basename(built))
            if not os.path.isdir(package_dir) or os.path.abspath(built) == os.path.abspath(target):
                continue
            tmp = target + ".tmp"
            try:
                shutil.copyfile(built, tmp)
                shutil.copymode(built, tmp)
                os.replace(tmp, target)
            except OSError as exc:
                if os.path.exists(tmp):
                    os.remove(tmp)
                print(f"cprop: could not copy {os.path.basename(built)} into {package_dir}: {exc}",
                      file=sys.stderr)


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

# The core is built twice on x86-64: for any CPU, and for x86-64-v3 (AVX2, FMA;
# most CPUs since 2013-2015), which cprop imports when the CPU has them.
AVX2_MODULE = "cprop._core_avx2"
AVX2_FLAGS = ["-march=x86-64-v3"]
build_avx2 = (platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
              and not _env_flag("CPROP_NATIVE") and not _env_flag("CPROP_NO_AVX2"))


def core_extension(name, source, extra_args=()):
    return Extension(name, [source], include_dirs=[numpy.get_include()],
                     define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                     extra_compile_args=compile_args + list(extra_args))


extensions = [core_extension("cprop._core", "src/_core.pyx")]
if build_avx2:
    extensions.append(core_extension(AVX2_MODULE, "src/_core_avx2.pyx", AVX2_FLAGS))

def _generated_c_is_current(extensions, fingerprint, stamp):
    """Whether every extension's .c was generated from today's sources with this fingerprint."""
    try:
        with open(stamp) as f:
            if json.load(f) != fingerprint:
                return False
    except (OSError, ValueError):
        return False
    newest_source = max(os.path.getmtime(p) for p in glob.glob(os.path.join(HERE, "src", "*.p*")))
    for ext in extensions:
        c_file = os.path.splitext(ext.sources[0])[0] + ".c"
        if not os.path.exists(c_file) or os.path.getmtime(c_file) < newest_source:
            return False
    return True


def cythonize_once(extensions):
    """cythonize, or the extensions built from the .c already generated with the same inputs."""
    import Cython
    import scipy
    fingerprint = {"directives": directives, "compile_args": compile_args, "avx2": build_avx2,
                   "no_openmp": _env_flag("CPROP_NO_OPENMP"),
                   "cython": Cython.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__}
    stamp = os.path.join(HERE, "build", "cprop-generated-c.json")
    if _generated_c_is_current(extensions, fingerprint, stamp):
        for ext in extensions:
            ext.sources = [os.path.splitext(ext.sources[0])[0] + ".c"]
        return extensions
    extensions = cythonize(extensions, include_path=["src"], compiler_directives=directives, force=True)
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        json.dump(fingerprint, f)
    return extensions


setup(
    ext_modules=cythonize_once(extensions),
    cmdclass={"build_ext": BuildExt},
)
