"""Harness over jisu artifacts: manifest.json (structured edits at any JSON path, and raw bytes),
config.json and the GGUF tokenizer metadata copy, loaded (and verified) as `jisu run` does."""
from __future__ import annotations

import json
import os
import shutil

from hypothesis import strategies as st

from .core import Harness
from .harness_models import _generate
from .mutate import apply, ops_strategy
from .values import json_value

FILES = ("manifest.json", "config.json", "tokenizer_gguf.json")


def _setup(workdir: str) -> dict:
    import jisu
    from tests.fixtures import write_gguf_llama

    src = write_gguf_llama(os.path.join(workdir, "tiny.gguf"))
    base = os.path.join(workdir, "art_base")
    jisu.compress.compress(src, base, "rtn:w4g32", samples=8, seq_len=64, eval_chunks=2, eval_ctx=64,
                           progress=False)
    folder = os.path.join(workdir, "art")
    shutil.copytree(base, folder)
    docs = {}
    for name in FILES:
        with open(os.path.join(base, name), "rb") as f:
            docs[name] = f.read()
    paths = {name: _paths(json.loads(docs[name])) for name in FILES}
    return {"folder": folder, "docs": docs, "paths": paths}


def _paths(doc, prefix=()) -> list[list]:
    """Every JSON path in `doc` (lists of keys / indices), big arrays sampled."""
    out = [list(prefix)]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += _paths(v, prefix + (i,))
    return out


def _strategy(ctx):
    def edits(name):
        path = st.sampled_from(ctx["paths"][name])
        edit = st.tuples(path, st.one_of(json_value(), st.just("<drop>"))).map(list)
        return st.fixed_dictionaries({"file": st.just(name), "edits": st.lists(edit, min_size=1, max_size=3)})

    raw = st.fixed_dictionaries({"file": st.sampled_from(FILES),
                                 "ops": ops_strategy(len(ctx["docs"]["manifest.json"]), 1 << 20, max_ops=4)})
    return st.one_of(edits("manifest.json"), edits("manifest.json"), edits("config.json"),
                     edits("tokenizer_gguf.json"), raw)


def _edit(doc, path: list, value):
    """`doc` with the value at `path` replaced (or dropped); unchanged where the path is gone."""
    if not path:
        return {} if value == "<drop>" else value
    node = doc
    try:
        for key in path[:-1]:
            node = node[key]
        if value == "<drop>":
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
    return doc


def _run(ctx: dict, case: dict) -> str:
    import jisu
    from jisu.io.artifact import verify_artifact

    name = case["file"]
    if "ops" in case:
        data = apply(ctx["docs"][name], case["ops"])
    else:
        doc = json.loads(ctx["docs"][name])
        for path, value in case["edits"]:
            doc = _edit(doc, path, value)
        data = json.dumps(doc).encode("utf-8", "surrogatepass")
    target = os.path.join(ctx["folder"], name)
    try:
        with open(target, "wb") as f:
            f.write(data)
        out = _generate(jisu.load(ctx["folder"]))
        verify_artifact(ctx["folder"])
        return out
    finally:
        with open(target, "wb") as f:
            f.write(ctx["docs"][name])


HARNESSES = [Harness("artifact", _setup, _strategy, _run)]
