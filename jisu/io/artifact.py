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

How one weight becomes named tensors: io/artifact_codec.py. Never pickle: safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields
from typing import Optional

import torch

from ..config import ModelConfig
from ..errors import ModelFormatError, UnsupportedError
from .artifact_codec import decode, encode

FORMAT_NAME = "jisu-artifact"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
MANIFEST = "manifest.json"
CONFIG = "config.json"
GGUF_TOKENIZER = "tokenizer_gguf.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                      "special_tokens_map.json")


# --- bit packing ------------------------------------------------------------------------------
def config_to_dict(cfg: ModelConfig) -> dict:
    d = asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def config_from_dict(d: dict, path: str) -> ModelConfig:
    names = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - names - {"jisu_artifact"}
    if unknown:
        raise ModelFormatError(f"{path}: unknown config fields {sorted(unknown)} (artifact from a newer jisu?)")
    from .config_check import build_config

    return build_config({k: v for k, v in d.items() if k in names}, path)


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


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def save_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """Write a safetensors file one tensor at a time (safetensors' save_file first copies every
    tensor into one buffer: twice the output in memory). Tensors are laid out by element size,
    largest first, then name, after a header padded to 8 bytes, so every tensor is aligned."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {"__metadata__": metadata}, 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            t = tensors[name].detach().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def write_artifact(folder: str, cfg: ModelConfig, tensors: dict, manifest: dict, *,
                   source_kind: str, source_path: str, same_as: Optional[dict] = None) -> dict:
    """Write model.safetensors, config.json, the tokenizer and manifest.json into `folder` (which
    must exist). `tensors`: name -> format object or tensor; `same_as`: name -> name stored once.
    Returns the manifest written (with per-tensor entries, sizes and file hashes)."""
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
    save_safetensors(os.path.join(folder, MODEL_FILE), st, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
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

def replace_folder(tmp: str, out: str) -> None:
    """Rename the finished folder `tmp` to `out`. An existing `out` is moved aside first and removed
    only once `tmp` is in place (put back if that rename fails), so `out` is never half written."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    parent, base = os.path.split(out)
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)


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
    if not isinstance(m.get("sizes", {}), dict):
        raise ModelFormatError(f"{folder}: manifest.json sizes is not an object of file sizes")
    return m


def verify_artifact(folder: str, manifest: Optional[dict] = None) -> dict:
    """Check every file's size and sha256 against the manifest; returns the manifest."""
    from .hf import _checked_child

    m = manifest or read_manifest(folder)
    for name, digest in m["files"].items():
        path = _checked_child(folder, name, "manifest.json files")
        if not os.path.isfile(path):
            raise ModelFormatError(f"{folder}: file {name!r} listed in manifest.json is missing")
        size = m.get("sizes", {}).get(name)
        if size is not None and not (isinstance(size, int) and not isinstance(size, bool)):
            raise ModelFormatError(f"{folder}: manifest.json sizes[{name!r}] = {size!r:.40} is not a byte count")
        if size is not None and os.path.getsize(path) != size:
            raise ModelFormatError(f"{path!r}: size {os.path.getsize(path)} differs from the manifest's {size} (truncated?)")
        if sha256_file(path) != digest:
            raise ModelFormatError(f"{path!r}: sha256 differs from the manifest (file changed or corrupt)")
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
    from .hf import SafetensorsFile

    m = manifest or read_manifest(folder)
    path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelFormatError(f"{folder}: artifact has no {MODEL_FILE}")
    f = SafetensorsFile(path)
    from ..memory import file_mapping, release_mapped

    try:
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
    except Exception as e:  # a mapping that fails, a view torch refuses
        raise ModelFormatError(f"{path}: corrupt artifact tensors ({e})") from None


def _sliceable(entry: dict) -> bool:
    shape = entry.get("shape")
    return (entry.get("format") in ("int8", "int2", "int3", "int4") and "lowrank" not in entry
            and isinstance(shape, list) and len(shape) == 2
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
