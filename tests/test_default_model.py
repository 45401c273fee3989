"""End to end on the default model (SmolLM2-135M-Instruct Q4_1 GGUF).

- jisu fp32 (jisu.load(packed=False): every tensor dequantized) against transformers loading the
  same GGUF dequantized to fp32: greedy ids (4 chat prompts x 64 tokens), prefill logits;
- the default load (packed Q4_1 + native kernels when built) stays close to those logits;
- the GGUF-built tokenizer against llama.cpp's "smollm" pre-tokenizer and transformers' GGUF tokenizer;
- the ChatML chat template, seeded sampling, stop strings and streaming (on the default load).

transformers' GGUF loader parses the file in pure Python (~40 s on 2 cores), so the model and
tokenizer it builds are saved once (fp32 safetensors + tokenizer.json, ~520 MB) under
.pytest_cache/d/jisu-hf-reference/<key>, keyed by the GGUF file and the transformers version, and
reloaded from there in later sessions (bit-identical weights; ~2 s)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from jisu.api import StreamState
from jisu.engine.native_runner import NativeRunner
from jisu.engine.runner import sequence_logits
from jisu.io.tokenizer import StreamDecoder
from jisu.models.layers import CausalContext

pytestmark = pytest.mark.e2e

transformers = pytest.importorskip("transformers", reason="the e2e reference needs transformers (pip install -e .[test])")

NEW_TOKENS = 64
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

PROMPTS = {
    "capital": [{"role": "user", "content": "What is the capital of France?"}],
    "code": [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    "system": [{"role": "system", "content": "You are a pirate. Answer in one sentence."},
               {"role": "user", "content": "How do I bake bread?"}],
    "multiturn": [{"role": "user", "content": "Give me three colours."},
                  {"role": "assistant", "content": "Red, green and blue."},
                  {"role": "user", "content": "Now three animals, with 2 legs or 4 legs."}],
}


# --- the transformers reference ----------------------------------------------------------------

def _reference_dir(gguf: str, request, tmp_path_factory) -> Path:
    st = os.stat(gguf)
    key = hashlib.sha256(f"{os.path.realpath(gguf)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
                         .encode()).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    root = Path(cache.mkdir("jisu-hf-reference")) if cache is not None else tmp_path_factory.mktemp("hf-reference")
    folder = root / key
    if (folder / "done").exists():
        return folder
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for old in root.iterdir():
        # other keys (another GGUF or transformers version), and builds abandoned over an hour ago;
        # a concurrent session's build of this key is left alone
        if old.name != key and (not old.name.startswith(key) or time.time() - old.stat().st_mtime > 3600):
            shutil.rmtree(old, ignore_errors=True)
    src = tmp_path_factory.mktemp("gguf")
    (src / "model.gguf").symlink_to(os.path.realpath(gguf))
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file="model.gguf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file="model.gguf")
    building = Path(tempfile.mkdtemp(prefix=key + ".tmp-", dir=root))
    model.config.save_pretrained(building)
    config = json.loads((building / "config.json").read_text())
    config.pop("quantization_config", None)  # the weights saved below are plain fp32
    (building / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_model(model, str(building / "model.safetensors"))  # handles the tied lm_head
    tokenizer.save_pretrained(building)
    (building / "done").write_text(gguf + "\n")
    try:
        building.rename(folder)
    except OSError:  # another session finished the same build first
        shutil.rmtree(building, ignore_errors=True)
    return folder


@pytest.fixture(scope="module")
def reference_dir(default_gguf, request, tmp_path_factory) -> Path:
    return _reference_dir(default_gguf, request, tmp_path_factory)


@pytest.fixture(scope="module")
def hf_model(reference_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32)
    assert model.dtype == torch.float32
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(reference_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reference_dir)


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy argmax with the KV cache, EOS not special (transformers' min_new_tokens would instead
    forbid EOS, which changes the sequence). Returns the ids and each step's logits."""
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    ids, logits = [], []
    while True:
        step = out.logits[0, -1].float()
        logits.append(step)
        ids.append(int(step.argmax()))
        if len(ids) == n:
            return ids, logits
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values, use_cache=True)


# --- greedy decoding and logits vs transformers (jisu fp32) ----------------------------------------

@pytest.fixture(scope="module")
def fp32_greedy(default_llm_fp32):
    """name -> jisu fp32's greedy chat completion of PROMPTS[name] (64 tokens, EOS ignored)."""
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = default_llm_fp32.chat(PROMPTS[name], temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        return done[name]
    return get


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_ids_match_transformers(default_llm_fp32, fp32_greedy, hf_model, name):
    got = fp32_greedy(name)
    prompt_ids = default_llm_fp32.tokenizer.encode_chat(PROMPTS[name])
    assert got.prompt_token_ids == prompt_ids  # both engines get jisu's prompt ids
    assert len(got.token_ids) == NEW_TOKENS and got.finish_reason == "length"
    want, steps = hf_greedy(hf_model, prompt_ids, NEW_TOKENS)
    if got.token_ids != want:
        k = next(i for i, (a, b) in enumerate(zip(got.token_ids, want)) if a != b)
        gap = float(steps[k][want[k]] - steps[k][got.token_ids[k]])
        # two implementations in fp32 may only part ways on a near-tie of the top two logits
        assert gap < 1e-3, (f"{name}: first difference at new token {k}: jisu {got.token_ids[k]}, transformers "
                            f"{want[k]} (logit gap {gap:.2e})\njisu {got.token_ids}\nhf   {want}")
        print(f"\n{name}: identical for {k} tokens, then a near-tie (logit gap {gap:.1e})")


def _prefill_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    """[T, V] of an engine runner (its own KV dtype) or of the reference model's whole-sequence forward."""
    if hasattr(model, "run"):
        return sequence_logits(model, prompt_ids)
    with torch.inference_mode():
        return model.forward(torch.tensor([prompt_ids]), CausalContext())[0]


@pytest.fixture(scope="module")
def reference_logits(default_llm_fp32, hf_model):
    prompt_ids = default_llm_fp32.tokenizer.encode_chat(PROMPTS["multiturn"])
    with torch.inference_mode():
        return prompt_ids, hf_model(input_ids=torch.tensor([prompt_ids])).logits[0].float()


def test_prefill_logits_match_transformers(default_llm_fp32, reference_logits, record_property):
    prompt_ids, ref = reference_logits
    models = {"jisu fp32": default_llm_fp32.runner}
    if isinstance(default_llm_fp32.runner, NativeRunner):  # the Python reference under the native step
        models["jisu fp32 (Python reference)"] = default_llm_fp32.model
    for label, model in models.items():
        ours = _prefill_logits(model, prompt_ids)
        assert ours.shape == ref.shape == (len(prompt_ids), default_llm_fp32.config.vocab_size)
        diff = (ours - ref).abs()
        max_diff = float(diff.max())
        record_property(f"max_abs_logit_diff[{label}]", max_diff)
        print(f"\n{label} vs transformers, prefill of {len(prompt_ids)} tokens: max |diff| = {max_diff:.3e} "
              f"(mean {float(diff.mean()):.3e}, max |logit| {float(ref.abs().max()):.1f})")
        assert max_diff < 1e-3, f"{label}: max abs logit difference {max_diff:.3e}"
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_default_quantized_path_stays_close(default_llm, reference_logits, record_property):
    """The default load (Q4_1 kept packed when the native kernels are built) is not bit-comparable
    with fp32, but must stay close: the same top token almost everywhere, small mean error."""
    prompt_ids, ref = reference_logits
    ours = _prefill_logits(default_llm.runner, prompt_ids)
    diff = (ours - ref).abs()
    agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    record_property("default_path_max_abs_logit_diff", float(diff.max()))
    print(f"\ndefault path vs transformers fp32: max |diff| {float(diff.max()):.3f}, mean {float(diff.mean()):.3f}, "
          f"top-1 agreement {agree:.0%}")
    assert agree >= 0.9 and float(diff.mean()) < 0.5


# --- tokenizer ------------------------------------------------------------------------------------

TEXTS = [
    "Hello, world!",
    "12345",
    "In 2024, 3.14159 and 1,000,000 people paid $19.99",
    " 1 22  333",
    "a1b22c333d",
    "x² + y³ = 10½ ²³ ٣٤ ５６",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # slow\n",
    "naïve café, 日本語のテキスト, Ελληνικά, 🤖🎉 👨\u200d👩\u200d👧",
    "  multiple   spaces   and\ttabs\t\t",
    "line1\nline2\n\n\nend\r\n",
    "I'm sure you'll see they'VE gone",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|>",
    "<not_special> <|im_start",
    " leading space",
    "trailing space ",
    "",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to 256, 257, ...
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def llama_cpp_smollm_encode(text: str, bpe, specials: list[str]) -> list[int]:
    """llama.cpp's reference for tokenizer.ggml.pre = "smollm" (LLAMA_VOCAB_PRE_TYPE_SMOLLM in
    llama-vocab.cpp): special tokens are split out first, then the regex list
    ["\\p{N}", GPT-2's regex] is applied in turn, each to the fragments the previous one left
    (unmatched spans are kept as fragments), then byte-level BPE runs on each fragment."""
    regex = pytest.importorskip("regex")
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
    byte_map = _bytes_to_unicode()

    def split(pattern: str, pieces: list[str]) -> list[str]:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos:m.start()], m.group()]
                pos = m.end()
            out.append(piece[pos:])
        return [p for p in out if p]

    parts = regex.split("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")", text)
    ids = []
    for i, part in enumerate(parts):
        if i % 2:  # a special token
            ids.append(bpe.token_to_id(part))
            continue
        for frag in split(gpt2, split(r"\p{N}", [part])):
            ids += [t.id for t in bpe.tokenize("".join(byte_map[b] for b in frag.encode("utf-8")))]
    return ids


def test_bytes_to_unicode_is_gpt2s():
    m = _bytes_to_unicode()
    assert len(set(m.values())) == 256 and m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("A")] == "A"


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_llama_cpp_reference(default_llm, hf_tokenizer, text):
    """jisu's encode against llama.cpp's smollm pre-tokenization run on the vocabulary and merges
    transformers read from the same GGUF, and decode round-trips."""
    tok = default_llm.tokenizer
    specials = [t.content for t in hf_tokenizer.added_tokens_decoder.values() if t.special]
    want = llama_cpp_smollm_encode(text, hf_tokenizer.backend_tokenizer.model, specials)
    ids = tok.encode(text, add_bos=False)
    assert ids == want
    assert tok.encode(text) == ids  # the GGUF says add_bos_token = false
    assert tok.decode(ids, skip_special=False) == text
    assert hf_tokenizer.decode(ids) == text


# transformers builds GGUF "gpt2" tokenizers with a plain ByteLevel pre-tokenizer and ignores
# tokenizer.ggml.pre = "smollm" (individual digits first, as llama.cpp and SmolLM2's own
# tokenizer.json do), so it differs where a digit split changes the GPT-2 regex pieces:
# " ²³" stays one piece, and "  333" becomes " " + " 333" instead of "  " + "333".
TRANSFORMERS_GGUF_DIGIT_BUG = {"x² + y³ = 10½ ²³ ٣٤ ５６", " 1 22  333"}


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(default_llm, hf_tokenizer, text):
    from tokenizers import pre_tokenizers

    ids = default_llm.tokenizer.encode(text, add_bos=False)
    hf_ids = hf_tokenizer.encode(text, add_special_tokens=False)
    if text in TRANSFORMERS_GGUF_DIGIT_BUG:
        assert ids != hf_ids, "transformers now splits digits for smollm GGUFs: drop this exception"
    else:
        assert ids == hf_ids
    # with the pre-tokenizer of SmolLM2's tokenizer.json restored, transformers agrees everywhere
    backend = hf_tokenizer.backend_tokenizer
    saved = backend.pre_tokenizer
    try:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        assert backend.encode(text, add_special_tokens=False).ids == ids
    finally:
        backend.pre_tokenizer = saved


def test_special_tokens(default_llm, hf_tokenizer):
    tok = default_llm.tokenizer
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tok.bos_id == 1 and 2 in default_llm.eos_ids
    assert tok.decode([1, 4093, 2]) == "user"  # specials skipped by default
    assert tok.vocab_size == len(hf_tokenizer) == default_llm.config.vocab_size == 49152


def test_stream_decoder_holds_partial_characters(default_llm):
    tok = default_llm.tokenizer
    text = "naïve café 日本語 🤖🎉 👨\u200d👩\u200d👧 done"
    ids = tok.encode(text)
    decoder = StreamDecoder(tok, tok.encode("Say:"))
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# --- chat template ---------------------------------------------------------------------------------

def test_chat_template_renders_chatml(default_llm, hf_tokenizer):
    tok = default_llm.tokenizer
    default_system = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    assert tok.render_chat(PROMPTS["capital"]) == (
        default_system + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_chat(PROMPTS["system"]) == (
        "<|im_start|>system\nYou are a pirate. Answer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_chat(PROMPTS["multiturn"], add_generation_prompt=False) == (
        default_system + "<|im_start|>user\nGive me three colours.<|im_end|>\n"
        "<|im_start|>assistant\nRed, green and blue.<|im_end|>\n"
        "<|im_start|>user\nNow three animals, with 2 legs or 4 legs.<|im_end|>\n")
    for messages in PROMPTS.values():
        assert tok.render_chat(messages) == hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode_chat(PROMPTS["capital"])
    assert ids[0] == 1 and ids[-4:] == tok.encode("<|im_start|>assistant\n")
    assert ids.count(1) == 3 and ids.count(2) == 2  # three <|im_start|>, two <|im_end|>


# --- sampling, stop strings, streaming -------------------------------------------------------------

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


def test_seeded_sampling_is_reproducible_and_streams_the_same(default_llm):
    opts = dict(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True)
    a = default_llm.chat(POEM, seed=1234, **opts)
    state = StreamState()
    streamed = "".join(default_llm.stream(POEM, seed=1234, state=state, **opts))
    c = default_llm.chat(POEM, seed=4321, **opts)
    assert len(a.token_ids) == 16
    assert state.completion.token_ids == a.token_ids and streamed == state.completion.text == a.text
    assert a.token_ids != c.token_ids  # could collide only with a vanishing probability


@pytest.fixture(scope="module")
def greedy_code(default_llm):
    """The default path's greedy answer to PROMPTS["code"] (64 tokens, EOS ignored)."""
    return default_llm.chat(PROMPTS["code"], temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_completion_text_is_decoded_ids(default_llm, greedy_code):
    full = greedy_code
    assert full.text == default_llm.tokenizer.decode(full.token_ids)
    timings = full.to_dict()["timings"]
    assert timings["generated_tokens"] == NEW_TOKENS and timings["prefill_s"] > 0 and timings["decode_tok_s"] > 0


def test_stop_strings_cut_the_text(default_llm, greedy_code):
    full = greedy_code
    words = full.text.split()
    stops = [words[len(words) // 4], full.text[12:19]]  # a word, and a span that likely crosses tokens
    for stop in stops:
        assert stop and stop in full.text
        got = default_llm.chat(PROMPTS["code"], temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True,
                               stop=["never-appears-§", stop])
        assert got.text == full.text[:full.text.index(stop)], stop
        assert got.finish_reason == "stop"
        n = len(got.token_ids)
        assert n < NEW_TOKENS and got.token_ids == full.token_ids[:n]


def test_stream_pieces_concatenate_to_text(default_llm, greedy_code):
    full = greedy_code
    state = StreamState()
    pieces = list(default_llm.stream(PROMPTS["code"], temperature=0, max_tokens=32, ignore_eos=True, state=state))
    assert len(pieces) > 5
    assert state.completion.token_ids == full.token_ids[:32]
    assert "".join(pieces) == state.completion.text == default_llm.tokenizer.decode(full.token_ids[:32])
    assert full.text.startswith(state.completion.text)
