"""jisu's logits against `transformers` on tiny random models of every architecture, loaded from
an HF folder (safetensors) and from a GGUF written the way llama.cpp writes one: a whole prompt in
one forward, and the same prompt through the KV cache (a prefill, a chunk, then one token at a time)."""
from __future__ import annotations

import pytest
import torch

import jisu
from jisu.engine.batch import StepBatch
from jisu.engine.kv_cache import PagedKVCache
from jisu.engine.runner import TorchRunner
from jisu.io.gguf import GGUFFile, gguf_config
from jisu.models.layers import CausalContext

from tests.fixtures import CASES, VOCAB_SIZE, Case, build_hf_model, save_hf, write_gguf

pytest.importorskip("transformers")
pytest.importorskip("gguf")

RTOL = 1e-4
SEQ = 20                        # longer than every sliding window in fixtures.CASES
PREFILL, CHUNK = 7, 4           # then SEQ - PREFILL - CHUNK single-token steps
GGUF_CASES = [name for name, c in CASES.items() if c.gguf_arch]
_built: dict[str, tuple] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def reference(name: str, tmp_path_factory) -> tuple[Case, object, str, torch.Tensor, torch.Tensor]:
    """(case, HF model, its saved folder, prompt [1, SEQ], HF logits [SEQ, V]), built once per case."""
    if name not in _built:
        case = CASES[name]
        model = build_hf_model(case, seed=0)
        folder = str(tmp_path_factory.mktemp(name))
        save_hf(model, folder)
        tokens = torch.randint(0, VOCAB_SIZE, (1, SEQ), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(tokens).logits[0].float()
        _built[name] = (case, model, folder, tokens, logits)
    return _built[name]


def check_logits(llm, tokens: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Compare the whole-prompt forward and incremental decoding through a paged KV cache (the torch
    runner: the reference model over the engine's cache) with `expected`; return the worst error."""
    model = llm.model
    worst = 0.0
    with torch.no_grad():
        full = model.forward(tokens, CausalContext())[0]
        assert full.shape == expected.shape
        err = rel_err(full, expected)
        assert err <= RTOL, f"{what}: whole prompt off by {err:.2e}"
        worst = max(worst, err)

        runner = TorchRunner(model)
        kv = PagedKVCache(model.cfg, 1, SEQ + 4)  # one block holds the whole sequence
        bounds = [0, PREFILL, PREFILL + CHUNK] + list(range(PREFILL + CHUNK + 1, SEQ + 1))
        for start, end in zip(bounds, bounds[1:]):
            step = StepBatch.single(tokens[0, start:end].tolist(), start, [0], list(range(end - start)))
            out = runner.run(step, kv)
            err = rel_err(out, expected[start:end])
            assert err <= RTOL, f"{what}: tokens {start}..{end - 1} through the cache off by {err:.2e}"
            worst = max(worst, err)
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_hf_folder_matches_transformers(name, tmp_path_factory):
    _, model, folder, tokens, expected = reference(name, tmp_path_factory)
    llm = jisu.load(folder)
    assert llm.config.arch == model.config.model_type.removesuffix("_text")
    check_logits(llm, tokens, expected, f"{name} (HF folder)")


@pytest.mark.parametrize("name", GGUF_CASES)
def test_gguf_matches_transformers(name, tmp_path_factory):
    case, model, folder, tokens, expected = reference(name, tmp_path_factory)
    path = str(tmp_path_factory.mktemp(f"{name}-gguf") / "model.gguf")
    write_gguf(model, case, path)
    hf_cfg = jisu.load(folder).config
    llm = jisu.load(path)
    # the GGUF config must describe the same model as config.json
    for field in ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_embeddings", "attn_bias",
                  "qk_norm", "sliding_window", "layer_types", "attn_softcap", "final_softcap",
                  "query_pre_attn_scalar", "rope_local_theta", "embed_scale"):
        assert getattr(llm.config, field) == pytest.approx(getattr(hf_cfg, field)), field
    check_logits(llm, tokens, expected, f"{name} (GGUF)")


@pytest.mark.parametrize("name", list(CASES))
def test_compression_numerics_match_transformers(name, tmp_path_factory):
    """The model as compression runs it (float32 reference numerics over model-form weights, the
    pieces composed layer by layer on a cache-free context) gives transformers' logits too, and its
    taps see the input of every linear, in order."""
    from jisu.compress.observe import CTX, ReferenceNumerics, compression_model, model_form
    from jisu.io.sources import load_weights, resolve
    from jisu.models.layers import HEAD, LINEARS, linear_name

    _, _, folder, tokens, expected = reference(name, tmp_path_factory)
    cfg, weights, _ = load_weights(resolve(folder), packed=False)
    model = compression_model(cfg, model_form(cfg, weights), ReferenceNumerics(exact=True))
    seen = []
    model.observer = lambda n, x: seen.append((n, x.shape[-1]))
    with torch.no_grad():
        x = model.embed(tokens)
        for i in range(cfg.num_layers):
            x = model.layer(i, x, CTX)
        logits = model.head(model.final_hidden(x))[0]
    assert rel_err(logits, expected) <= RTOL
    width = {"o": cfg.num_heads * cfg.head_dim, "down": cfg.intermediate_size}
    assert seen == [(linear_name(i, s), width.get(s, cfg.hidden_size)) for i in range(cfg.num_layers)
                    for s in LINEARS] + [(HEAD, cfg.hidden_size)]
    model.observer = None
    assert torch.equal(model.forward(tokens, CTX)[0], logits)


def test_sliding_windows_are_exercised():
    for case in CASES.values():
        window = case.config.get("sliding_window")
        assert window is None or window < SEQ - 1


def test_gguf_gemma_27b_attention_scale(tmp_path):
    """llama.cpp scales Gemma 2/3 27B queries by (hidden / heads) ** -0.5, not head_dim ** -0.5
    (query_pre_attn_scalar is not in the GGUF); the size is known by the layer count."""
    import gguf

    for arch, layers in (("gemma2", 46), ("gemma3", 62), ("gemma2", 42)):
        path = str(tmp_path / f"{arch}-{layers}.gguf")
        w = gguf.GGUFWriter(path, arch)
        w.add_context_length(128)
        w.add_embedding_length(96)
        w.add_block_count(layers)
        w.add_feed_forward_length(32)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_key_length(16)
        w.add_value_length(16)
        w.add_sliding_window(8)
        w.add_tensor("token_embd.weight", torch.zeros(8, 96).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        cfg = gguf_config(GGUFFile(path))
        expected = 96 / 4 if layers in (46, 62) else 16
        assert cfg.query_pre_attn_scalar == expected, (arch, layers)


def _legacy_config(cfg: dict) -> dict:
    """config.json as transformers 4.x wrote it: rope_theta / rope_scaling (/ rope_local_base_freq)
    instead of rope_parameters, and no layer_types."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    if "full_attention" in rope:
        cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    cfg["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    types = cfg.pop("layer_types", None)
    if cfg["model_type"] == "gemma3_text":
        pattern = types.index("full_attention") + 1
        assert types == ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                         for i in range(len(types))]
        cfg["sliding_window_pattern"] = pattern
    return cfg


@pytest.mark.parametrize("name", ["llama3_rope", "llama_linear_rope", "mistral", "gemma2", "gemma3",
                                  "gemma3_pattern"])
def test_legacy_hf_config(name, tmp_path_factory):
    """A transformers-4 config.json gives the same ModelConfig as the transformers-5 one."""
    import dataclasses
    import json
    import os

    from jisu.io.hf import hf_config

    folder = reference(name, tmp_path_factory)[2]
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    legacy = str(tmp_path_factory.mktemp(f"{name}-legacy"))
    with open(os.path.join(legacy, "config.json"), "w") as f:
        json.dump(_legacy_config(cfg), f)

    def fields(c):
        d = dataclasses.asdict(c)
        d["rope_scaling"] = {k: v for k, v in (d["rope_scaling"] or {}).items() if k != "rope_theta"} or None
        return d

    assert fields(hf_config(legacy)) == fields(hf_config(folder))
