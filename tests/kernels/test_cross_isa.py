"""Checks the kernels this machine cannot run natively: the NEON path, cross-compiled and run
under qemu-aarch64 (skipped unless aarch64-linux-gnu-g++ and qemu-aarch64 are installed), and
the import-time ISA self-check that guards untested paths such as AVX-512."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from jisu.kernels import ops

from .helpers import K, needs_native

HERE = os.path.dirname(__file__)
SRC = os.path.join(HERE, "..", "..", "jisu", "kernels", "cpu")


# the kernel tables of every ISA, without the Python bindings
KERNEL_SOURCES = [os.path.join(SRC, f) for f in ("kernels_scalar.cpp", "kernels_neon.cpp", "kernels_avx2.cpp",
                                                 "kernels_avx512.cpp", "attention.cpp", "ggml.cpp",
                                                 "ggml_q32.cpp", "ggml_kq.cpp")]


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")
def test_neon_matches_scalar_under_qemu(tmp_path):
    exe = tmp_path / "cross_isa_check"
    subprocess.run(["aarch64-linux-gnu-g++", "-O1", "-std=c++20", "-ffp-contract=off", "-I", SRC,
                    os.path.join(HERE, "cross_isa_check.cpp"), *KERNEL_SOURCES, "-o", str(exe)], check=True)
    r = subprocess.run(["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert "testing neon" in r.stdout and r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not (shutil.which("g++") and os.uname().machine == "x86_64"), reason="needs g++ on x86-64")
def test_x86_paths_match_scalar_natively(tmp_path):
    """The same C++ check on this CPU: AVX2, and AVX-512 (VNNI) where the CPU has it, bitwise
    against scalar, with refined activation blocks on and off."""
    exe = tmp_path / "cross_isa_check"
    subprocess.run(["g++", "-O1", "-std=c++20", "-ffp-contract=off", "-I", SRC,
                    os.path.join(HERE, "cross_isa_check.cpp"), *KERNEL_SOURCES, "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert "testing avx2" in r.stdout and r.returncode == 0, r.stdout + r.stderr


@needs_native
def test_isa_self_check_keeps_agreeing_paths(monkeypatch):
    # Pretend the paths on this machine are untested: each must pass the check and stay.
    monkeypatch.setattr(ops, "_UNTESTED_ISAS", tuple(K.available_isas()))
    before = K.get_isa()
    assert ops._verify_isas() == K.available_isas()
    assert K.get_isa() == before


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_pool_survives_fork():
    """A child forked after the worker threads started must not wait on threads it lacks."""
    import torch

    from jisu.kernels.formats import Int4Weight
    from jisu.kernels.packed import pack

    p = pack(Int4Weight.quantize_rtn(torch.randn(512, 256), 32))
    x = torch.randn(8, 256)
    ref = ops.linear(x, p)  # starts the pool
    pid = os.fork()
    if pid == 0:  # child
        ok = torch.equal(ops.linear(x, p), ref)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
