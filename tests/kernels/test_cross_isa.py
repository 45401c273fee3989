"""Checks the kernels this machine cannot run natively: the NEON path, cross-compiled and run
under qemu-aarch64 (skipped unless aarch64-linux-gnu-g++ and qemu-aarch64 are installed), and
the import-time ISA self-check that guards untested paths such as AVX-512."""
from __future__ import annotations

import os
import sys

import pytest

from jisu.kernels import ops

from .cpp_check import AARCH64, X86, needs_qemu, needs_x86, run_check
from .helpers import K, needs_native


@needs_qemu
def test_neon_matches_scalar_under_qemu(tmp_path):
    assert "testing neon" in run_check("cross_isa_check", AARCH64, tmp_path, timeout=300)


@needs_x86
def test_x86_paths_match_scalar_natively(tmp_path):
    """The same C++ check on this CPU: AVX2, and AVX-512 (VNNI) where the CPU has it, bitwise
    against scalar, with refined activation blocks on and off."""
    assert "testing avx2" in run_check("cross_isa_check", X86, tmp_path, timeout=300)


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
