"""jisu artifacts: a compressed model as a folder (written by `jisu compress`, read by jisu.load).

    manifest.json        format version, source (path, sha256), recipe, per-tensor format, bits per
                         weight, sizes, quality measured when it was made, jisu version, sha256 of
                         every other file
    model.safetensors    per quantized weight NAME the parts of its logical format
                         (jisu.kernels.formats): NAME.q (codes, bit-packed), NAME.scale, NAME.min,
                         NAME.idx (codebook indices, bit-packed), NAME.codebook; unquantized
                         tensors under their own name, as they are
    config.json          the ModelConfig fields
    tokenizer.json ...   HF sources: the tokenizer files, copied
    tokenizer_gguf.json  GGUF sources: the GGUF's tokenizer.* metadata (rebuilt with gguf_tokenizer)

Codes are packed little-endian within each row: 8 codes of `bits` bits make `bits` bytes, code
i of the 8 in bits [bits*i, bits*(i+1)). Scales are float16 where that is exact (the formats
round group scales to float16), else float32. Never pickle: safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, fields
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..errors import ModelFormatError, UnsupportedError

FORMAT_NAME = "jisu-artifact"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
MANIFEST = "manifest.json"
CONFIG = "config.json"
GGUF_TOKENIZER = "tokenizer_gguf.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                      "special_tokens_map.json")


# --- bit packing ------------------------------------------------------------------------------
PACK_ROWS_ELEMS = 1 << 20  # codes packed per slice

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (K % 8 == 0, values < 2**bits) -> uint8 [N, K * bits // 8]."""
    N, K = codes.shape
    if bits == 8:
        return codes.contiguous()
    out = torch.empty(N, K * bits // 8, dtype=torch.uint8)
    shift = bits * torch.arange(8, dtype=torch.int32)
    byte = 8 * torch.arange(bits, dtype=torch.int64)
    rows = max(1, PACK_ROWS_ELEMS // max(K, 1))   # row slices: the int64 temporaries stay small
    for r0 in range(0, N, rows):
        c = codes[r0:r0 + rows].to(torch.int32).view(-1, K // 8, 8)
        v = (c << shift).sum(-1, dtype=torch.int64)                  # < 2**(8*bits)
        b = (v[..., None] >> byte) & 255                              # [n, K/8, bits]
        out[r0:r0 + rows] = b.to(torch.uint8).view(-1, K * bits // 8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of pack_bits, with small intermediates (uint8 shifts; int32 for 3 bits)."""
    N = packed.shape[0]
    p = packed.view(torch.uint8)
    if bits == 8:
        return p.reshape(N, K)
    out = torch.empty(N, K, dtype=torch.uint8)
    rows = max(1, PACK_ROWS_ELEMS // max(K, 1))   # row slices: the temporaries stay small
    for r0 in range(0, N, rows):
        _unpack_rows(p[r0:r0 + rows], bits, K, out[r0:r0 + rows])
    return out


def _unpack_rows(p: torch.Tensor, bits: int, K: int, out: torch.Tensor) -> None:
    n = p.shape[0]
    if bits in (2, 4):
        per = 8 // bits
        o = out.view(n, K // per, per)
        for i in range(per):
            torch.bitwise_and(p >> (bits * i), (1 << bits) - 1, out=o[:, :, i])
        return
    b = p.reshape(n, K // 8, bits).to(torch.int32)
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)   # 3 bits: 8 codes in 3 bytes
    o = out.view(n, K // 8, 8)
    for i in range(8):
        o[:, :, i] = (v >> (bits * i)) & ((1 << bits) - 1)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float16 when that holds the values exactly, else float32."""
    t = t.to(torch.float32).contiguous()
    h = t.to(torch.float16)
    return h if torch.equal(h.to(torch.float32), t) else t


# --- formats <-> tensors ------------------------------------------------------------------------

def encode(name: str, obj) -> tuple[dict[str, torch.Tensor], dict]:
    """(safetensors entries, manifest entry) for one weight: a format object or a tensor."""
    from ..kernels.formats import NF4_TABLE, CodebookWeight, Int8Weight, IntWeight

    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous()
        entry = {"format": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "parts": {"data": name}}
        return {name: t}, _sized(entry, {name: t})
    N, K = obj.shape
    parts: dict[str, torch.Tensor] = {}
    if isinstance(obj, Int8Weight):
        entry = {"format": "int8", "group_size": obj.group_size}
        parts["q"] = obj.q.to(torch.int8).contiguous()
        parts["scale"] = (obj.scale.to(torch.float32).contiguous() if obj.group_size is None
                          else _compact(obj.scale))
    elif isinstance(obj, IntWeight):
        entry = {"format": f"int{obj.bits}", "group_size": obj.group_size, "sym": not obj.asym,
                 "packing": "le-bits"}
        parts["q"] = pack_bits(obj.q.to(torch.uint8), obj.bits)
        parts["scale"] = _compact(obj.scale)
        if obj.asym:
            parts["min"] = _compact(obj.min)
    elif isinstance(obj, CodebookWeight):
        cb = obj.codebook.to(torch.float32)
        nf4 = torch.equal(cb, NF4_TABLE.expand_as(cb))
        entry = {"format": "codebook", "table": "nf4" if nf4 else "per-row", "entries": 16,
                 "group_size": obj.group_size if obj.scale is not None else None, "packing": "le-bits"}
        parts["idx"] = pack_bits(obj.idx.to(torch.uint8), 4)
        if not nf4:
            parts["codebook"] = _compact(cb)
        if obj.scale is not None:
            parts["scale"] = _compact(obj.scale)
    else:
        raise TypeError(f"{name}: cannot store {type(obj).__name__}")
    entry["shape"] = [N, K]
    named = {f"{name}.{k}": v for k, v in parts.items()}
    entry["parts"] = {k: f"{name}.{k}" for k in parts}
    return named, _sized(entry, named)


def _sized(entry: dict, tensors: dict) -> dict:
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    numel = 1
    for d in entry["shape"]:
        numel *= d
    entry["bytes"] = nbytes
    entry["bits_per_weight"] = nbytes * 8 / numel if numel else 0.0
    return entry


def decode(name: str, entry: dict, get) -> Any:
    """The format object (or tensor) for a manifest entry; `get(key)` reads a safetensors tensor."""
    from ..kernels.formats import NF4_TABLE, CodebookWeight, Int8Weight
    from ..kernels.formats import Int2Weight, Int3Weight, Int4Weight

    try:
        kind, shape, parts = entry["format"], entry["shape"], entry["parts"]
        N, K = (shape + [0, 0])[:2] if kind in ("int8", "int2", "int3", "int4", "codebook") else (0, 0)
    except (KeyError, TypeError, ValueError):
        raise ModelFormatError(f"manifest entry for {name} is malformed") from None

    def part(k):
        if k not in parts:
            raise ModelFormatError(f"{name}: manifest lists no part {k!r}")
        return get(parts[k])

    def check(t, shp, what):
        if tuple(t.shape) != tuple(shp):
            raise ModelFormatError(f"{name}: {what} has shape {tuple(t.shape)}, expected {tuple(shp)}")
        return t

    g = entry.get("group_size")
    if g is not None and (not isinstance(g, int) or g <= 0 or K % g):
        raise ModelFormatError(f"{name}: bad group size {g!r} for K={K}")
    ng = K // g if g else None
    if kind == "int8":
        q = check(part("q"), (N, K), "q").view(torch.int8)
        s = check(part("scale"), (N,) if g is None else (N, ng), "scale").to(torch.float32)
        return Int8Weight(q, s, g)
    if kind in ("int2", "int3", "int4"):
        bits = int(kind[3:])
        cls = {2: Int2Weight, 3: Int3Weight, 4: Int4Weight}[bits]
        q = unpack_bits(check(part("q"), (N, K * bits // 8), "q"), bits, K)
        s = check(part("scale"), (N, ng), "scale").to(torch.float32)
        m = None if entry.get("sym", True) else check(part("min"), (N, ng), "min").to(torch.float32)
        return cls(q, s, g, m)
    if kind == "codebook":
        idx = unpack_bits(check(part("idx"), (N, K // 2), "idx"), 4, K)
        if entry.get("table") == "nf4":
            cb = NF4_TABLE.expand(N, 16).contiguous()
        else:
            cb = check(part("codebook"), (N, 16), "codebook").to(torch.float32)
        s = check(part("scale"), (N, ng), "scale").to(torch.float32) if g else None
        return CodebookWeight(idx, cb, s, g)
    if kind in ("float32", "float16", "bfloat16"):
        t = check(part("data"), shape, "tensor")
        return t if t.dtype == torch.float32 else t.float()
    raise UnsupportedError(f"{name}: unknown tensor format {kind!r} (artifact from a newer jisu?)")


# --- config -------------------------------------------------------------------------------------

def config_to_dict(cfg: ModelConfig) -> dict:
    d = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def config_from_dict(d: dict, path: str) -> ModelConfig:
    names = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - names - {"jisu_artifact"}
    if unknown:
        raise ModelFormatError(f"{path}: unknown config fields {sorted(unknown)} (artifact from a newer jisu?)")
    kw = {k: v for k, v in d.items() if k in names}
    for k in ("layer_types", "eos_token_ids"):
        if k in kw and isinstance(kw[k], list):
            kw[k] = tuple(kw[k])
    try:
        return ModelConfig(**kw)
    except TypeError as e:
        raise ModelFormatError(f"{path}: bad config ({e})") from None


# --- files --------------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(v):
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def gguf_tokenizer_meta(gguf_path: str) -> dict:
    """The tokenizer.* metadata of a GGUF (tokens, merges, types, scores, special ids, template, pre)."""
    from .gguf import GGUFFile

    meta = GGUFFile(gguf_path).metadata
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


def write_tokenizer(folder: str, source_kind: str, source_path: str) -> list[str]:
    """Copy (HF) or extract (GGUF) the tokenizer into `folder`; returns the file names written."""
    import shutil

    written = []
    if source_kind == "gguf":
        write_json(os.path.join(folder, GGUF_TOKENIZER), gguf_tokenizer_meta(source_path))
        written.append(GGUF_TOKENIZER)
    elif source_kind == "artifact":
        for name in (GGUF_TOKENIZER,) + HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source_path, name)):
                shutil.copyfile(os.path.join(source_path, name), os.path.join(folder, name))
                written.append(name)
    else:
        for name in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source_path, name)):
                shutil.copyfile(os.path.join(source_path, name), os.path.join(folder, name))
                written.append(name)
    return written


def write_artifact(folder: str, cfg: ModelConfig, tensors: dict, manifest: dict, *,
                   source_kind: str, source_path: str, same_as: Optional[dict] = None) -> dict:
    """Write model.safetensors, config.json, the tokenizer and manifest.json into `folder` (which
    must exist). `tensors`: name -> format object or tensor; `same_as`: name -> name stored once.
    Returns the manifest written (with per-tensor entries, sizes and file hashes)."""
    from safetensors.torch import save_file

    from ..version import __version__

    same_as = same_as or {}
    st, entries = {}, {}
    for name, obj in tensors.items():
        if name in same_as:
            continue
        named, entry = encode(name, obj)
        st.update(named)
        entries[name] = entry
    for name, target in same_as.items():
        entries[name] = {**{k: v for k, v in entries[target].items() if k != "bytes"}, "same_as": target, "bytes": 0}
    save_file(st, os.path.join(folder, MODEL_FILE), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(folder, MODEL_FILE), 0o666 & ~umask)  # like the other files (not the 0600 of a temp file)
    write_json(os.path.join(folder, CONFIG), {**config_to_dict(cfg), "jisu_artifact": FORMAT_VERSION})
    tok_files = write_tokenizer(folder, source_kind, source_path)
    files = [MODEL_FILE, CONFIG] + tok_files
    sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in files}
    m = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "jisu_version": __version__, **manifest,
         "tensors": entries, "sizes": {**sizes, "total": sum(sizes.values())},
         "files": {f: sha256_file(os.path.join(folder, f)) for f in files}}
    write_json(os.path.join(folder, MANIFEST), m)
    return m


# --- reading ------------------------------------------------------------------------------------

def is_artifact(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(folder: str) -> dict:
    from .hf import read_json

    m = read_json(os.path.join(folder, MANIFEST))
    if m.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{folder}: manifest.json is not a jisu artifact manifest")
    v = m.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION or v < 1:
        raise UnsupportedError(f"{folder}: artifact format version {v!r} is not supported (this jisu reads "
                               f"up to {FORMAT_VERSION})")
    if not isinstance(m.get("tensors"), dict) or not isinstance(m.get("files"), dict):
        raise ModelFormatError(f"{folder}: manifest.json lacks tensors/files")
    return m


def verify_artifact(folder: str, manifest: Optional[dict] = None) -> dict:
    """Check every file's size and sha256 against the manifest; returns the manifest."""
    from .hf import _checked_child

    m = manifest or read_manifest(folder)
    for name, digest in m["files"].items():
        path = _checked_child(folder, name, "manifest.json files")
        if not os.path.isfile(path):
            raise ModelFormatError(f"{folder}: file {name} listed in manifest.json is missing")
        size = m.get("sizes", {}).get(name)
        if size is not None and os.path.getsize(path) != size:
            raise ModelFormatError(f"{path}: size {os.path.getsize(path)} differs from the manifest's {size} (truncated?)")
        if sha256_file(path) != digest:
            raise ModelFormatError(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    return m


def to_runtime(fmt):
    """A format object as the models run it: packed for the native kernels (dequantized float32
    weights where the packed path cannot take it)."""
    from ..kernels.packed import pack

    try:
        return pack(fmt)
    except (TypeError, ValueError):
        return fmt.dequantize()


SLICED_ELEMS = 1 << 23  # integer matrices larger than this load a slice of rows at a time (packed=True)


def iter_formats(folder: str, manifest: Optional[dict] = None, packed: bool = False):
    """(name, format object or float tensor) for every stored tensor, one at a time (entries
    stored once under another name, "same_as", are skipped: see _same_as). packed: a large
    integer matrix comes already packed for the kernels, decoded and packed a slice of rows at a
    time with each slice's file pages released (its codes are never whole in memory)."""
    from safetensors import safe_open

    from .hf import check_safetensors

    m = manifest or read_manifest(folder)
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{folder}: artifact has no {MODEL_FILE}")
    check_safetensors(path)
    from ..memory import file_mapping, release_mapped

    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            read: list[torch.Tensor] = []
            mapping = []  # the file's mapping, found once (after the first tensor is read)

            def release(t: torch.Tensor) -> None:
                """The file pages under t leave this process's RSS (the caller has converted it)."""
                if not mapping:
                    mapping.append(file_mapping(path))
                if mapping[0] is not None:
                    release_mapped(t.data_ptr(), t.numel() * t.element_size(), mapping[0])

            def get(key):
                if key not in keys:
                    raise ModelFormatError(f"{path}: tensor {key!r} named in the manifest is missing")
                t = f.get_tensor(key)
                read.append(t)
                return t

            for name, entry in m["tensors"].items():
                if not isinstance(entry, dict):
                    raise ModelFormatError(f"{folder}: manifest entry for {name} is malformed")
                if "same_as" not in entry:
                    obj = (_sliced(name, entry, get, release) if packed and _sliceable(entry)
                           else decode(name, entry, get))
                    # a plain tensor is kept as it is: its own memory, not a view that would keep
                    # the file's whole mapping (and every page read from it) resident
                    yield name, (obj.clone() if isinstance(obj, torch.Tensor) else obj)
                    for t in read:
                        release(t)
                    read.clear()
    except (ModelFormatError, UnsupportedError):
        raise
    except Exception as e:  # safetensors errors
        raise ModelFormatError(f"{path}: corrupt artifact tensors ({e})") from None


def _sliceable(entry: dict) -> bool:
    shape = entry.get("shape")
    return (entry.get("format") in ("int8", "int2", "int3", "int4") and isinstance(shape, list) and len(shape) == 2
            and all(isinstance(d, int) and d > 0 for d in shape) and shape[0] * shape[1] > SLICED_ELEMS)


def _sliced(name: str, entry: dict, get, release):
    """The packed weight of a large integer matrix, decoded a slice of rows at a time."""
    from ..kernels.packed import NR, PACK_CHUNK_BYTES, PackedInt

    N, K = entry["shape"]
    step = max(NR, PACK_CHUNK_BYTES // K // NR * NR)

    def slices():
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            read = []

            def rows(key):
                t = get(key)[r0:r1]
                read.append(t)
                return t

            yield decode(name, {**entry, "shape": [r1 - r0, K]}, rows)
            for t in read:
                release(t)

    return PackedInt.from_slices(N, slices())


def _same_as(folder: str, m: dict) -> dict:
    same = {n: e["same_as"] for n, e in m["tensors"].items() if isinstance(e, dict) and "same_as" in e}
    for name, target in same.items():
        if target not in m["tensors"] or "same_as" in m["tensors"][target]:
            raise ModelFormatError(f"{folder}: {name} is stored as {target!r}, which is not stored")
    return same


def load_formats(folder: str, manifest: Optional[dict] = None) -> tuple[dict, dict]:
    """(name -> format object or float tensor, same_as) from the artifact's model.safetensors."""
    m = manifest or read_manifest(folder)
    same_as = _same_as(folder, m)
    return dict(iter_formats(folder, m)), same_as


def load_artifact(folder: str, progress: bool = False, verify: bool = False, packed: bool = True):
    """(config, weights for the model, tokenizer) of an artifact folder. Quantized linears become
    packed kernel weights (packed=False: their dequantized float32 values, the reference path);
    so is a quantized embedding (its rows are decoded when looked up; a tied LM head runs the
    same packed weight, as with a GGUF). Tensors are decoded and packed one at a time, so loading
    needs little beyond the result."""
    runtime = to_runtime if packed else (lambda fmt: fmt.dequantize())
    from .hf import read_json

    m = verify_artifact(folder) if verify else read_manifest(folder)
    cfg = config_from_dict(read_json(os.path.join(folder, CONFIG)), os.path.join(folder, CONFIG))
    same_as = _same_as(folder, m)
    # the tokenizer first: the garbage of building it is reused by the weights' temporaries
    # instead of adding to the peak on top of them
    tokenizer = load_tokenizer(folder)
    weights = {}
    for name, obj in iter_formats(folder, m, packed=packed):
        weights[name] = obj if isinstance(obj, torch.Tensor) else runtime(obj)
    for name, target in same_as.items():
        weights[name] = weights[target]  # one object: a tied head streams the embedding's packed bytes
    return cfg, weights, tokenizer


def load_tokenizer(folder: str):
    from .tokenizer import gguf_tokenizer, load_hf_tokenizer

    gguf_meta = os.path.join(folder, GGUF_TOKENIZER)
    if os.path.isfile(gguf_meta):
        try:
            with open(gguf_meta, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"{gguf_meta}: cannot read ({e})") from None
        if not isinstance(meta, dict):
            raise ModelFormatError(f"{gguf_meta}: expected a JSON object")
        return gguf_tokenizer(meta, folder)
    return load_hf_tokenizer(folder)
