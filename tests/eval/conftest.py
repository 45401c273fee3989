"""Tiny models shared by the eval tests (built once per module in a temporary folder)."""
from __future__ import annotations

import pytest

from tests.fixtures import write_gguf_llama, write_hf_llama


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> str:
    return write_gguf_llama(str(tmp_path_factory.mktemp("eval") / "tiny.gguf"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> str:
    return write_hf_llama(str(tmp_path_factory.mktemp("eval") / "tiny_hf"))


@pytest.fixture(scope="session")
def tiny_llm(tiny_gguf):
    import jisu

    return jisu.load(tiny_gguf, threads=1)
