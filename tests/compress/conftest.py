"""Tiny models for the compression tests: hidden 64 / intermediate 128 so every group size up to
64 divides K (tests/fixtures.py's default model has hidden 32)."""
from __future__ import annotations

import json
import os

import pytest

from tests.fixtures import TINY, tiny_weights, write_gguf_llama, write_hf_llama

CFG = {**TINY, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


def write_tiny_hf(folder: str, seed: int = 0, cfg: dict = CFG, tied: bool = False) -> str:
    """tests/fixtures.py's HF folder (tokenizer, template) with this module's sizes."""
    from safetensors.torch import save_file

    write_hf_llama(folder, seed)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config |= cfg
    config["tie_word_embeddings"] = tied
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    w = tiny_weights(seed, cfg)
    if tied:
        w.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in w.items()}, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> str:
    return write_tiny_hf(str(tmp_path_factory.mktemp("compress") / "tiny_hf"))


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory) -> str:
    return write_tiny_hf(str(tmp_path_factory.mktemp("compress") / "tiny_tied"), seed=1, tied=True)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> str:
    """tests/fixtures.py's GGUF (hidden 32): checks the GGUF tokenizer path of artifacts."""
    return write_gguf_llama(str(tmp_path_factory.mktemp("compress") / "tiny.gguf"))


# small, fast settings for compress() in tests
FAST = dict(samples=8, seq_len=64, eval_chunks=2, eval_ctx=64, progress=False)
