"""GGUF reading (GGUF v2/v3 as written by llama.cpp's converters): header validation, metadata,
ModelConfig, and tensors mapped to HF names, dequantized through jisu.io.gguf_quants."""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import ModelFormatError, UnsupportedError

GGUF_MAGIC = b"GGUF"
MAX_KV_COUNT = 1 << 20
MAX_TENSOR_COUNT = 1 << 20
MAX_STRING_BYTES = 1 << 28
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40

# GGUF value types -> numpy dtype of one scalar (strings and arrays handled apart).
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                  10: "<u8", 11: "<i8", 12: "<f8"}
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
               12: "<d"}
_T_STRING, _T_ARRAY, _T_BOOL = 8, 9, 7


@dataclass
class _Header:
    metadata: dict
    tensors: list          # (name, dims in GGUF order, type id, offset from the data start)
    data_start: int


def _read_header(path: str, size: int) -> _Header:
    """Parse the GGUF header (metadata and tensor infos), checking every count and length against
    the bytes that remain before using it, so absurd values are rejected without allocating.
    (gguf.GGUFReader trusts these numbers, and builds a numpy view per string: ~6 s for the
    default model's 100k-token vocabulary, against ~0.2 s here.)"""
    import mmap

    if size == 0:
        raise ModelFormatError(f"{path}: not a valid GGUF file (file too short)")
    with open(path, "rb") as f:  # mapped, not read: only the header's pages are touched
        head = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse_header(path, head)
    finally:
        try:
            head.close()
        except BufferError:  # a numpy view still alive (an exception's traceback): let GC close it
            pass


def _parse_header(path: str, head) -> _Header:
    def fail(what: str) -> ModelFormatError:
        return ModelFormatError(f"{path}: not a valid GGUF file ({what})")

    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise fail("bad magic; expected 'GGUF'" if len(head) >= 4 else "file too short")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
    if version not in (2, 3):
        raise fail(f"unsupported GGUF version {version}")
    if n_tensors > MAX_TENSOR_COUNT or n_kv > MAX_KV_COUNT:
        raise fail(f"absurd counts: {n_tensors} tensors, {n_kv} metadata keys")
    pos = 24

    def need(n: int) -> None:
        if n < 0 or pos + n > len(head):
            raise fail("header is truncated or a length runs past the end")

    def read_u64() -> int:
        nonlocal pos
        need(8)
        (v,) = struct.unpack_from("<Q", head, pos)
        pos += 8
        return v

    def read_u32() -> int:
        nonlocal pos
        need(4)
        (v,) = struct.unpack_from("<I", head, pos)
        pos += 4
        return v

    def read_string(what: str = "string") -> str:
        nonlocal pos
        n = read_u64()
        if n > MAX_STRING_BYTES:
            raise fail(f"string of {n} bytes")
        need(n)
        raw = head[pos:pos + n]
        pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(f"{what} is not UTF-8") from None

    def read_value(vtype: int, depth: int = 0):
        nonlocal pos
        if vtype in _SCALAR_FMT:
            fmt = _SCALAR_FMT[vtype]
            need(struct.calcsize(fmt))
            (v,) = struct.unpack_from(fmt, head, pos)
            pos += struct.calcsize(fmt)
            return v
        if vtype == _T_STRING:
            return read_string()
        if vtype == _T_ARRAY and depth < 2:
            item_type, count = read_u32(), read_u64()
            if item_type in _SCALAR_DTYPES:
                dt = np.dtype(_SCALAR_DTYPES[item_type])
                need(count * dt.itemsize)
                arr = np.frombuffer(head, dtype=dt, count=count, offset=pos)
                pos += count * dt.itemsize
                out = (arr != 0).tolist() if item_type == _T_BOOL else arr.tolist()
                del arr  # no view of the mapping may outlive the parse
                return out
            if count > len(head) - pos:  # every item takes at least a byte
                raise fail(f"array of {count} items")
            return [read_value(item_type, depth + 1) for _ in range(count)]
        raise fail(f"unknown metadata value type {vtype}")

    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = read_string("a metadata key")
        metadata[key] = read_value(read_u32())
    tensors = []
    for _ in range(n_tensors):
        name = read_string("a tensor name")
        n_dims = read_u32()
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise fail(f"tensor with {n_dims} dimensions")
        dims = [read_u64() for _ in range(n_dims)]
        if int(np.prod(dims, dtype=object)) > MAX_ELEMENTS:
            raise fail(f"tensor of {int(np.prod(dims, dtype=object))} elements")
        tensors.append((name, dims, read_u32(), read_u64()))
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise fail(f"bad general.alignment {align!r}")
    return _Header(metadata, tensors, (pos + align - 1) // align * align)


@dataclass
class GGUFTensor:
    name: str
    qtype: Any              # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # row-major (numpy) order: the reverse of GGUF's ne[]
    data: np.ndarray        # raw bytes, memory-mapped


class GGUFFile:
    """An open GGUF file: metadata as plain Python values and tensors as memory-mapped bytes."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise ModelFormatError(f"{self.path}: cannot read ({e.strerror})") from None
        header = _read_header(self.path, size)
        self.metadata: dict[str, Any] = header.metadata
        mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._mm = mm
        self._spans: dict[str, tuple[int, int]] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in header.tensors:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedError(f"{self.path}: tensor {name!r} has unknown type id {type_id}") from None
            if name in self.tensors:
                raise ModelFormatError(f"{self.path}: tensor {name!r} appears twice")
            shape = tuple(int(d) for d in reversed(dims))
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if shape[-1] % block:
                raise ModelFormatError(f"{self.path}: tensor {name!r} row of {shape[-1]} is not a multiple of {block}")
            nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
            start = header.data_start + offset
            if start + nbytes > size:
                raise ModelFormatError(f"{self.path}: tensor {name!r} runs past the end of the file (truncated?)")
            self.tensors[name] = GGUFTensor(name, qtype, shape, mm[start:start + nbytes])
            self._spans[name] = (start, nbytes)
        self.arch = str(self.metadata.get("general.architecture", ""))

    def release(self, name: str, part: tuple[int, int] | None = None) -> None:
        """Unmap the pages of a tensor that has been copied or converted from this process (they
        count in its RSS once read; touched again, they come back from the page cache). part:
        (offset, bytes) within the tensor, to release as a large tensor is consumed."""
        import mmap

        m = getattr(self._mm, "_mmap", None)
        if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, n = self._spans[name]
        if part is not None:
            start, n = start + part[0], min(part[1], n - part[0])
        page = mmap.PAGESIZE
        a, b = start // page * page, min(-(-(start + n) // page) * page, len(m))
        if b > a:
            m.madvise(mmap.MADV_DONTNEED, a, b - a)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def dequantize(self, name: str) -> torch.Tensor:
        from .gguf_quants import dequantize

        t = self.tensors[name]
        try:
            return dequantize(t.data, t.qtype, t.shape)
        except (UnsupportedError, ModelFormatError) as e:
            raise type(e)(f"{self.path}: tensor {name!r}: {e}") from None


# --- architecture mapping --------------------------------------------------------------

_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
               "gemma2": "gemma2", "gemma3": "gemma3", "smollm3": None}

# GGUF per-layer tensor names -> HF names (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}
_GEMMA_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                      "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight", "rope_freqs.weight": "rope_freqs"}


def hf_name(gguf_name: str, family: str) -> str | None:
    """The HF-style name of a GGUF tensor, or None if jisu does not use it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        table = _GEMMA_LAYER_NAMES if family == "gemma" else _LLAMA_LAYER_NAMES
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return None


# Layer counts of the 27B Gemmas, whose queries are scaled by (hidden / heads) ** -0.5 instead of
# head_dim ** -0.5. GGUF does not store query_pre_attn_scalar; llama.cpp picks the scale this way.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _gemma_query_scalar(arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> float:
    return float(hidden // heads if n_layers == _GEMMA_27B_LAYERS.get(arch) else head_dim)


def gguf_config(g: GGUFFile) -> ModelConfig:
    arch = g.arch
    if arch not in _GGUF_ARCHS or _GGUF_ARCHS[arch] is None:
        raise UnsupportedError(f"{g.path}: unknown architecture {arch!r} "
                               f"(supported: {', '.join(a for a, v in _GGUF_ARCHS.items() if v)})")

    def meta(key: str, default: Any = None, required: bool = False) -> Any:
        v = g.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ModelFormatError(f"{g.path}: metadata {arch}.{key} is missing")
        return v

    hidden = int(meta("embedding_length", required=True))
    heads = int(meta("attention.head_count", required=True))
    head_dim = int(meta("attention.key_length", 0) or hidden // heads)
    if "token_embd.weight" not in g.tensors:
        raise ModelFormatError(f"{g.path}: no token_embd.weight tensor")
    # the embedding's rows are the model's vocabulary (token lists may be shorter or padded)
    vocab = int(meta("vocab_size", 0) or g.tensors["token_embd.weight"].shape[0])
    n_layers = int(meta("block_count", required=True))
    kw: dict[str, Any] = {}
    if arch in ("gemma2", "gemma3"):
        window = meta("attention.sliding_window")
        if arch == "gemma2":
            types = tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
        else:
            # llama.cpp's Gemma 3: every 6th layer is global, the rest use the sliding window
            types = tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(n_layers))
        kw.update(sliding_window=int(window) if window else None, layer_types=types if window else (),
                  attn_softcap=meta("attn_logit_softcapping"), final_softcap=meta("final_logit_softcapping"),
                  query_pre_attn_scalar=_gemma_query_scalar(arch, n_layers, hidden, heads, head_dim),
                  embed_scale=hidden ** 0.5, hidden_act="gelu_tanh",
                  rope_local_theta=10000.0 if arch == "gemma3" else None, qk_norm=arch == "gemma3")
    # Linear RoPE scaling (convert_hf_to_gguf.py writes it for any architecture; Gemma 3 applies it
    # to its global layers only). Llama 3 scaling comes as the rope_freqs tensor instead.
    factor = meta("rope.scaling.factor")
    if factor and meta("rope.scaling.type", "linear") == "linear":
        kw["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    eos = g.get("tokenizer.ggml.eos_token_id")
    eot = g.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
    bos = g.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch=arch, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length", required=True)),
        num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position=int(meta("context_length", 4096)),
        tie_embeddings="output.weight" not in g.tensors,
        attn_bias="blk.0.attn_q.bias" in g.tensors,
        qk_norm=kw.pop("qk_norm", "blk.0.attn_q_norm.weight" in g.tensors),
        bos_token_id=int(bos) if bos is not None else None, eos_token_ids=eos_ids, **kw)


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its converter reorders rows so that RoPE rotates
    adjacent pairs); jisu's models use HF's rotate-half layout."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(g: GGUFFile, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, fp32 tensor) for every tensor jisu uses, converted to HF conventions."""
    for name in g.tensors:
        target = hf_name(name, cfg.family)
        if target is None:
            continue
        w = g.dequantize(name)
        if cfg.arch in ("llama", "mistral"):
            if target.endswith("q_proj.weight") or target.endswith("q_proj.bias"):
                w = _unpermute_qk(w, cfg.num_heads)
            elif target.endswith("k_proj.weight") or target.endswith("k_proj.bias"):
                w = _unpermute_qk(w, cfg.num_kv_heads)
        if cfg.family == "gemma" and target.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's (1 + w) norm weights with the 1 folded in
        yield target, w
