"""The architecture registry: a toy architecture declared in this file (a Llama under its own
model_type, with its own config.json field names and norms stored as offsets from 1) is registered,
loaded from an HF folder and a GGUF through jisu.load, and must give the logits of the Llama it is;
every registered name resolves; an unknown one is a one-line error."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import jisu
from jisu.config import ModelConfig, archs
from jisu.errors import JisuError
from jisu.models import build_model, common, llama, names, register
from jisu.models.llama import LlamaModel
from jisu.models.layers import CausalContext

from tests.fixtures import TINY, tiny_weights, write_gguf_llama, write_hf_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- the toy architecture: these module-level names are its declaration ----------------------------

HF_TYPES = {"toyllama": "toyllama"}
GGUF_ARCHS = ("toyllama",)
GGUF_LAYER_NAMES = llama.GGUF_LAYER_NAMES
NORM_OFFSET = 0.0
NATIVE = False


def config_from_hf(d: dict, where: str) -> ModelConfig:
    return ModelConfig(arch="toyllama", vocab_size=d["n_vocab"], hidden_size=d["d_model"],
                       intermediate_size=d["d_ff"], num_layers=d["n_layer"], num_heads=d["n_head"],
                       num_kv_heads=d["n_kv_head"], head_dim=d["d_model"] // d["n_head"], rms_norm_eps=d["eps"])


def config_from_gguf(metadata: dict, shapes: dict, where: str) -> ModelConfig:
    return ModelConfig(**common.gguf_fields(metadata, shapes, "toyllama", where))


def load_transform(cfg: ModelConfig, source: str, name: str):
    if source == "hf" and name.endswith("norm.weight"):
        return lambda w: w + 1.0  # the toy's config.json folder stores each norm as w - 1
    if source == "gguf":
        return common.qk_unpermute(cfg, name)  # written as llama.cpp writes a Llama
    return None


MODEL = LlamaModel


# --- tests -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    module = sys.modules[__name__]
    register(module)
    yield module
    for name in names(module):
        del archs()[name]


def reference_logits(weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The tiny Llama of tests/fixtures.py on `weights`, run by LlamaModel."""
    cfg = ModelConfig(arch="llama", vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"],
                      intermediate_size=TINY["intermediate_size"], num_layers=TINY["num_hidden_layers"],
                      num_heads=TINY["num_attention_heads"], num_kv_heads=TINY["num_key_value_heads"],
                      head_dim=TINY["hidden_size"] // TINY["num_attention_heads"], rms_norm_eps=1e-5)
    model = LlamaModel(cfg, dict(weights))
    return model.forward(tokens, CausalContext())


def run(llm, tokens: torch.Tensor) -> torch.Tensor:
    return llm.model.forward(tokens, CausalContext())


TOKENS = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(3))


def test_toy_hf_folder(tmp_path):
    from safetensors.torch import save_file

    folder = write_hf_llama(str(tmp_path / "toy"))
    stored = {k: (v - 1.0 if k.endswith("norm.weight") else v) for k, v in tiny_weights(0).items()}
    save_file(stored, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "toyllama", "n_vocab": TINY["vocab_size"], "d_model": TINY["hidden_size"],
                   "d_ff": TINY["intermediate_size"], "n_layer": TINY["num_hidden_layers"],
                   "n_head": TINY["num_attention_heads"], "n_kv_head": TINY["num_key_value_heads"], "eps": 1e-5}, f)
    llm = jisu.load(folder, native=False)
    assert llm.config.arch == "toyllama" and isinstance(llm.model, LlamaModel)
    expected = reference_logits({k: (v + 1.0 if k.endswith("norm.weight") else v) for k, v in stored.items()},
                                TOKENS)
    assert torch.equal(run(llm, TOKENS), expected)


def test_toy_gguf(tmp_path):
    pytest.importorskip("gguf")
    path = write_gguf_llama(str(tmp_path / "toy.gguf"), arch="toyllama")
    llm = jisu.load(path, packed=False, native=False)
    assert llm.config.arch == "toyllama" and llm.config.intermediate_size == TINY["intermediate_size"]
    assert torch.equal(run(llm, TOKENS), reference_logits(tiny_weights(0), TOKENS))


def test_toy_gguf_packed_gets_the_same_transform(tmp_path):
    """The packed path applies the load transform to a quantized matrix's rows: Q8_0 is lossless,
    so its packed q/k weights decode to the dequantized path's tensors exactly."""
    gguf = pytest.importorskip("gguf")
    from jisu.kernels import ops

    if not ops.native_available():
        pytest.skip("jisu._kernels is not built")
    path = write_gguf_llama(str(tmp_path / "toy.gguf"), arch="toyllama", tensor_type=gguf.GGMLQuantizationType.Q8_0)
    plain = jisu.load(path, packed=False, native=False).model.w
    packed = jisu.load(path, packed=True, native=False).model.w
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert not isinstance(packed[name], torch.Tensor)
        assert torch.equal(packed[name].dequantize(), plain[name]), name


def test_every_registered_name_resolves():
    for name, module in archs().items():
        assert name in names(module)
        cfg = ModelConfig(arch=name, vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=4)
        assert cfg.family == module.__name__.rpartition(".")[2]
        for attr in ("HF_TYPES", "GGUF_ARCHS", "GGUF_LAYER_NAMES", "NORM_OFFSET", "NATIVE",
                     "config_from_hf", "config_from_gguf", "load_transform", "MODEL"):
            assert hasattr(module, attr), (name, attr)
    assert {"llama", "mistral", "smollm2", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text"} <= set(archs())
    w = tiny_weights(0)
    cfg = ModelConfig(arch="smollm2", vocab_size=TINY["vocab_size"], hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    assert type(build_model(cfg, dict(w))) is LlamaModel


def test_import_jisu_leaves_the_architectures_unloaded():
    """The architecture modules load the kernels: `import jisu` defers them to the registry's first use."""
    import subprocess

    code = ("import sys, jisu, jisu.config\n"
            "assert 'jisu.models.llama' not in sys.modules and 'jisu.kernels.ops' not in sys.modules\n"
            "jisu.ModelConfig(arch='qwen3', vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,\n"
            "                 num_heads=2, num_kv_heads=1, head_dim=4)\n"
            "assert 'jisu.models.llama' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def test_unknown_architecture_is_one_line():
    with pytest.raises(JisuError, match=r"unknown architecture 'mamba9' \(supported: .*llama") as err:
        ModelConfig(arch="mamba9", vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=4)
    assert "\n" not in str(err.value)


def test_a_name_registers_once(toy_registered):
    register(toy_registered)  # again: no change
    clash = type(sys)("clash")
    clash.HF_TYPES, clash.GGUF_ARCHS = {"llama": "llama"}, ()
    with pytest.raises(JisuError, match="'llama' is already registered"):
        register(clash)
    assert archs()["llama"] is llama


def test_gguf_per_layer_widths(tmp_path):
    """llama.cpp may store feed_forward_length and head counts per layer (layers of their own widths)."""
    gguf = pytest.importorskip("gguf")
    from jisu.io.gguf import GGUFFile, gguf_config

    path = str(tmp_path / "pruned.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_feed_forward_length([64, 48])
    w.add_head_count([4, 2])
    w.add_head_count_kv([2, 2])
    w.add_tensor("token_embd.weight", torch.zeros(8, 32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = gguf_config(GGUFFile(path))
    assert (cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (64, 4, 2)
    assert [cfg.mlp_width(i) for i in range(2)] == [64, 48]
    assert [cfg.heads(i) for i in range(2)] == [(4, 2), (2, 2)]


def test_pruned_mlp_loads_and_runs(tmp_path):
    """A Llama whose second layer's MLP is narrower loads (the shape check takes the per-layer
    width) and runs as the same weights do in LlamaModel."""
    from safetensors.torch import save_file

    folder = write_hf_llama(str(tmp_path / "pruned"))
    w = tiny_weights(0)
    p = "model.layers.1.mlp."
    w[p + "gate_proj.weight"], w[p + "up_proj.weight"] = w[p + "gate_proj.weight"][:40], w[p + "up_proj.weight"][:40]
    w[p + "down_proj.weight"] = w[p + "down_proj.weight"][:, :40].contiguous()
    save_file({k: v.contiguous() for k, v in w.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        d = json.load(f)
    d["intermediate_size"] = [TINY["intermediate_size"], 40]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f)
    llm = jisu.load(folder)
    assert llm.config.intermediate_sizes == (TINY["intermediate_size"], 40)
    assert torch.equal(run(llm, TOKENS), reference_logits(w, TOKENS))
    d["intermediate_size"] = [TINY["intermediate_size"], 48]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(JisuError, match=r"layers.1.mlp.down_proj.weight has shape \(32, 40\), config says \(32, 48\)"):
        jisu.load(folder)


def test_hf_per_layer_widths(tmp_path):
    from jisu.io.hf import hf_config

    folder = write_hf_llama(str(tmp_path / "pruned"))
    with open(os.path.join(folder, "config.json")) as f:
        d = json.load(f)
    d.update(intermediate_size=[64, 32], num_attention_heads=[4, 2], num_key_value_heads=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f)
    cfg = hf_config(folder)
    assert (cfg.intermediate_size, cfg.num_heads, cfg.head_dim) == (64, 4, 8)
    assert cfg.intermediate_sizes == (64, 32) and cfg.layer_heads == ((4, 2), (2, 2))
    d.update(intermediate_size=[64, 32, 16])
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(JisuError, match="the MLP width has 3 entries for 2 layers"):
        hf_config(folder)
