"""Builds the C++ checks (a main in tests/kernels/*_check.cpp linked with the kernel tables of every
ISA, without the Python bindings) for this CPU or, cross-compiled, for aarch64 under qemu. The
kernel sources are compiled once per compiler per test session, in parallel, and every check
links those objects."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(__file__)
SRC = os.path.join(HERE, "..", "..", "jisu", "kernels", "cpu")
KERNEL_SOURCES = [os.path.join(SRC, f) for f in ("kernels_scalar.cpp", "kernels_neon.cpp", "kernels_avx2.cpp",
                                                 "kernels_avx512.cpp", "attention.cpp", "ggml.cpp",
                                                 "ggml_q32.cpp", "ggml_kq.cpp")]
FLAGS = ["-O1", "-std=c++20", "-ffp-contract=off", "-I", SRC]
X86, AARCH64 = "g++", "aarch64-linux-gnu-g++"
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]

needs_x86 = pytest.mark.skipif(not (shutil.which(X86) and os.uname().machine == "x86_64"), reason="needs g++ on x86-64")
needs_qemu = pytest.mark.skipif(not (shutil.which(AARCH64) and shutil.which("qemu-aarch64")),
                                reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")


@functools.cache
def kernel_objects(compiler: str) -> tuple[str, ...]:
    """The kernel sources compiled by `compiler` (cached for the session, removed at exit)."""
    out = tempfile.mkdtemp(prefix=f"jisu-kernels-{os.path.basename(compiler)}-")

    def one(src: str) -> str:
        obj = os.path.join(out, os.path.basename(src) + ".o")
        subprocess.run([compiler, *FLAGS, "-c", src, "-o", obj], check=True)
        return obj

    import atexit

    atexit.register(shutil.rmtree, out, True)
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return tuple(pool.map(one, KERNEL_SOURCES))


def run_check(name: str, compiler: str, tmp_path, timeout: int = 600) -> str:
    """Builds tests/kernels/`name`.cpp for `compiler` and runs it (under qemu for aarch64); its
    stdout, after asserting it exited 0."""
    exe = tmp_path / name
    subprocess.run([compiler, *FLAGS, os.path.join(HERE, f"{name}.cpp"), *kernel_objects(compiler), "-o", str(exe)],
                   check=True)
    r = subprocess.run([*(QEMU if compiler == AARCH64 else []), str(exe)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
