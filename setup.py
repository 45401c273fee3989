"""Builds jisu's native CPU kernel library, jisu._kernels (pybind11, no libtorch).

All ISA variants (scalar, AVX2, AVX-512, NEON) are compiled into one module; the x86
SIMD files select their instruction set with `#pragma GCC target`, so no -march flag
is needed and the module runs on any CPU of the architecture (dispatch at import).
"""
import os
import sys
from glob import glob

from setuptools import Extension, setup

try:
    import pybind11
    from pybind11.setup_helpers import ParallelCompile
except ImportError:  # pragma: no cover - pyproject's build-system requires it
    sys.exit("building jisu needs pybind11: pip install pybind11 (or build with isolation)")

# Compile the sources in parallel (JISU_BUILD_JOBS overrides the CPU count).
ParallelCompile("JISU_BUILD_JOBS", default=0).install()

SRC_DIR = os.path.join("jisu", "kernels", "cpu")
sources = sorted(glob(os.path.join(SRC_DIR, "*.cpp")))
headers = sorted(glob(os.path.join(SRC_DIR, "*.h")) + glob(os.path.join(SRC_DIR, "*.inc")))

compile_args = [
    "-O3",
    "-std=c++20",            # std::atomic wait/notify for the thread pool
    "-fvisibility=hidden",
    "-ffp-contract=off",     # keep scalar float rounding identical to the SIMD order
    "-fno-math-errno",
    "-pthread",
]
if os.environ.get("JISU_DEBUG_BUILD"):
    compile_args += ["-O0", "-g"]

ext = Extension(
    "jisu._kernels",
    sources=sources,
    depends=headers,
    include_dirs=[pybind11.get_include(), SRC_DIR],
    language="c++",
    extra_compile_args=compile_args,
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext])
