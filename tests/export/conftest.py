"""A tiny Llama whose rows are multiples of 256 (so every K-quant applies), as an F32 GGUF."""
import os

import pytest

from tests.fixtures import TINY, tiny_weights, write_gguf_file

WIDE = dict(TINY, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def wide_gguf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "wide.F32.gguf")
    w = {k: v * (0.25 if v.dim() == 2 and "embed" not in k else 1.0) for k, v in tiny_weights(3, WIDE).items()}
    write_gguf_file(path, "llama", w, {**WIDE, "rms_norm_eps": 1e-5, "name": "wide"}, chat=True,
                    chat_template="{{ messages[0]['content'] }}", permute=True,
                    extra=lambda wr: wr.add_rope_freq_base(10000.0))
    assert os.path.getsize(path) > 0
    return path
