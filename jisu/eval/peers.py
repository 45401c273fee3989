"""Peer engines `jisu bench --against` measures on the same model: llama.cpp (through the
llama-cpp-python package, on the GGUF) and Hugging Face transformers (on the dequantized weights).
Module-level imports are stdlib only: a llama.cpp measurement process must not load torch."""
from __future__ import annotations

import importlib.util
import os
import time

PEERS = ("llama.cpp", "transformers")
LLAMA_CPP_INSTALL = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python  (builds llama.cpp, ~10 min)'


def unavailable(peer: str, kind: str) -> str | None:
    """Why `peer` cannot run a model of this kind ("gguf" | "hf" | other), or None when it can.
    Checked without importing the package (imports are slow and may fail loudly)."""
    if peer == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return f"llama-cpp-python is not installed; install it with: {LLAMA_CPP_INSTALL}"
        if kind != "gguf":
            return "llama.cpp runs GGUF files only; the model is not a GGUF"
        return None
    if peer == "transformers":
        if importlib.util.find_spec("transformers") is None:
            return "transformers is not installed; install it with: pip install transformers"
        if kind not in ("gguf", "hf"):
            return "transformers loads GGUF files and HF folders only"
        return None
    return f"unknown peer {peer!r} (known: {', '.join(PEERS)})"


def gguf_weight_bytes(path: str) -> tuple[int, str]:
    """(weight bytes per decoded token, dominant tensor type) of a GGUF, read from its tensor table."""
    from jisu.eval.speed import bytes_per_token
    from jisu.io.gguf import GGUFFile

    g = GGUFFile(path)
    sizes = {name: int(t.data.nbytes) for name, t in g.tensors.items()}
    by_type: dict[str, int] = {}
    for t in g.tensors.values():
        by_type[t.qtype.name] = by_type.get(t.qtype.name, 0) + int(t.data.nbytes)
    rows = g.tensors["token_embd.weight"].shape[0]
    return bytes_per_token(sizes, "token_embd.weight", rows, "output.weight"), max(by_type, key=by_type.get)


class LlamaCppEngine:
    """llama.cpp via llama-cpp-python's Llama: eval() for prefill, generate() for greedy decoding."""
    name = "llama.cpp"

    def __init__(self, model: str, threads: int | None, n_ctx: int = 1024):
        import llama_cpp

        self.version = llama_cpp.__version__
        self._mod = llama_cpp
        self.path, self.threads, self.n_ctx = model, threads, n_ctx
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - t0
        self._scorer = None

    def prefill(self, ids):
        self.llm.reset()  # drop the KV cache so nothing is reused from the previous run
        self.llm.eval(list(ids))

    def generate(self, ids, n):
        self.llm.reset()  # otherwise generate() reuses the cached prompt prefix and skips prefill
        stamps = []
        # temp 0 selects llama.cpp's greedy sampler; generate() itself never stops at EOS
        for _ in self.llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                   reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return stamps

    def next_token_logits(self, ids):
        if self._scorer is None:  # scoring needs logits at every position: a second context with logits_all
            if hasattr(self.llm, "close"):
                self.llm.close()
            self.llm = None
            self._scorer = self._mod.Llama(model_path=self.path, n_ctx=max(self.n_ctx, len(ids)), n_batch=512,
                                           n_threads=self.threads, n_threads_batch=self.threads,
                                           logits_all=True, verbose=False)
        self._scorer.reset()
        self._scorer.eval(list(ids))
        return self._scorer.scores[:len(ids)].copy()

    def weight_bytes_per_token(self):
        return gguf_weight_bytes(self.path)[0]

    def weight_format(self) -> str:
        return gguf_weight_bytes(self.path)[1]


class _Stamps:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first pushes the prompt
            self._prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


class TransformersEngine:
    """transformers AutoModelForCausalLM in fp32 (a GGUF is dequantized on load), greedy generate()."""
    name = "transformers"

    def __init__(self, model: str, threads: int | None):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        if threads:
            torch.set_num_threads(threads)
        self.version = transformers.__version__
        self._torch = torch
        t0 = time.perf_counter()
        if os.path.isfile(model):
            folder, name = os.path.split(os.path.abspath(model))
            self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.model.eval()
        self.load_s = time.perf_counter() - t0

    def prefill(self, ids):
        torch = self._torch
        with torch.inference_mode():
            self.model(torch.tensor([list(ids)]), use_cache=True)

    def generate(self, ids, n):
        torch = self._torch
        streamer = _Stamps()
        with torch.inference_mode():
            # min_new_tokens masks EOS, so every run produces exactly n tokens
            self.model.generate(torch.tensor([list(ids)]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=None,
                                top_p=None, top_k=None, streamer=streamer, pad_token_id=0)
        return streamer.stamps

    def next_token_logits(self, ids):
        torch = self._torch
        with torch.inference_mode():
            return self.model(torch.tensor([list(ids)])).logits[0].float()

    def weight_bytes_per_token(self):
        from jisu.eval.speed import bytes_per_token, storage_nbytes

        sizes = {name: storage_nbytes(p) for name, p in self.model.named_parameters()}  # tied head listed once
        embed = next(n for n in sizes if n.endswith("embed_tokens.weight"))
        rows = self.model.get_input_embeddings().weight.shape[0]
        return bytes_per_token(sizes, embed, rows, "lm_head.weight")

    def weight_format(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def make_peer(name: str, path: str, threads: int | None, n_ctx: int = 1024):
    """The peer engine for a resolved model path. Imports nothing from jisu at load time (see speed.py)."""
    if name == "llama.cpp":
        return LlamaCppEngine(path, threads, n_ctx)
    if name == "transformers":
        return TransformersEngine(path, threads)
    raise ValueError(f"unknown peer {name!r}")
