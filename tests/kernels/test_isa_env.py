"""JISU_ISA forces the kernels' ISA for a process (e.g. the AVX2 path on an AVX-512 machine), and a
name this CPU cannot run is refused at import with the names it can."""
import os
import subprocess
import sys

import pytest

from jisu.kernels import ops

pytestmark = pytest.mark.skipif(not ops.VERIFIED_ISAS, reason="no native kernels")


def _run(isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JISU_ISA=isa)
    return subprocess.run([sys.executable, "-c", "from jisu.kernels import ops; print(ops.get_isa())"],
                          env=env, capture_output=True, text=True, timeout=300)


def test_isa_env_forces_the_scalar_path():
    r = _run("scalar")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "scalar"


def test_isa_env_best_and_each_verified_isa():
    for name in ops.VERIFIED_ISAS:
        r = _run(name.upper())  # case does not matter
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == name
    r = _run("best")
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == ops.get_isa()


def test_isa_env_rejects_an_unknown_name():
    r = _run("avx9000")
    assert r.returncode != 0
    assert "JISU_ISA='avx9000'" in r.stderr and "scalar" in r.stderr
    # a JisuError: the CLI prints it as one line and exits 2
    code = ("from jisu.errors import JisuError\n"
            "try:\n    import jisu.kernels.ops\nexcept JisuError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, JISU_ISA="avx9000"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("refused: JISU_ISA='avx9000'"), r.stderr
