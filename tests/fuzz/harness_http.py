"""Harness over the HTTP API: hypothesis-made JSON bodies (the request models' own fields with
hostile values, unknown fields, wrong JSON types, raw bytes) sent in process to the app serving the
tiny model. Property: a 2xx or a 4xx in the OpenAI error shape, never a 5xx."""
from __future__ import annotations

import json
import os

from hypothesis import strategies as st

from .core import Harness
from .values import json_value

ENDPOINTS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
             "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}

_TEXT = st.one_of(st.sampled_from(["hello", "the cat", "\ud800", "a\udfffb", "", "<|im_start|>", "\x00"]),
                  st.text(max_size=12))
_CONTENT = st.one_of(_TEXT, st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]),
                                                            "text": _TEXT}), max_size=2), json_value())
_MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                            "content": _CONTENT}, optional={"name": _TEXT}), json_value())
_SMALL = st.integers(-2, 6)
_FLOAT = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, 2.0]))
_PLAUSIBLE = {
    "prompt": st.one_of(_TEXT, st.lists(st.integers(-2, 400), max_size=5), st.lists(_TEXT, max_size=3),
                        st.lists(st.lists(st.integers(0, 300), max_size=3), max_size=2)),
    "messages": st.lists(_MESSAGE, max_size=3), "tokens": st.lists(st.integers(-2, 400), max_size=6),
    "max_tokens": st.integers(-2, 24), "max_completion_tokens": st.integers(-2, 24), "n": _SMALL,
    "best_of": _SMALL, "logprobs": st.one_of(st.booleans(), _SMALL), "top_logprobs": st.integers(-1, 25),
    "temperature": _FLOAT, "top_p": _FLOAT, "min_p": _FLOAT, "presence_penalty": _FLOAT,
    "frequency_penalty": _FLOAT, "repetition_penalty": _FLOAT, "top_k": _SMALL, "seed": st.integers(-1, 2**64),
    "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=5)), "stop_token_ids": st.lists(st.integers(-1, 400), max_size=3),
    "stream": st.booleans(), "echo": st.booleans(), "ignore_eos": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), json_value()),
    "model": st.one_of(st.none(), _TEXT), "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])},
                              optional={"json_schema": json_value()}), json_value()),
}


def _fields(model_name: str) -> list[str]:
    from jisu.serve import protocol

    return sorted(getattr(protocol, model_name).model_fields)


def _body(path: str):
    fields = _fields(ENDPOINTS[path])
    value = {f: st.one_of(_PLAUSIBLE[f], _PLAUSIBLE[f], _PLAUSIBLE[f], json_value()) if f in _PLAUSIBLE
             else json_value() for f in fields}
    required = {"/v1/completions": ["prompt"], "/v1/chat/completions": ["messages"]}.get(path, [])
    doc = st.fixed_dictionaries({f: value[f] for f in required},
                                optional={**{f: value[f] for f in fields if f not in required}, "zzz": json_value()})
    return st.one_of(doc, doc, doc, doc, json_value(), st.binary(max_size=20).map(lambda b: {"<raw>": b.hex()}))


def _strategy(ctx):
    return st.one_of(*[st.tuples(st.just(p), _body(p)).map(list) for p in ENDPOINTS])


def _setup(workdir: str) -> dict:
    import jisu
    from fastapi.testclient import TestClient

    from jisu.serve.app import create_app
    from tests.fixtures import write_hf_llama

    llm = jisu.load(write_hf_llama(os.path.join(workdir, "tiny")))
    client = TestClient(create_app(llm, max_concurrency=4, max_queue=16), raise_server_exceptions=False)
    return {"client": client, "started": False}


def _run(ctx: dict, case: list) -> str:
    from jisu.errors import JisuError

    path, body = case
    if not ctx["started"]:  # the app's lifespan (the engine) runs until the process ends; started by the
        ctx["client"].__enter__()  # first case, so that a coverage run started after setup sees its threads
        ctx["started"] = True
    if isinstance(body, dict) and "<raw>" in body and len(body) == 1:
        data = bytes.fromhex(body["<raw>"])
    else:
        data = json.dumps(body).encode("utf-8", "surrogatepass")
    r = ctx["client"].post(path, content=data, headers={"content-type": "application/json"})
    text = r.text
    if r.status_code >= 500 or "internal_error" in text:
        raise AssertionError(f"{path} answered {r.status_code}: {text[:300]}")
    if r.status_code >= 400:
        err = r.json().get("error", {})
        if not isinstance(err, dict) or not err.get("message"):
            raise AssertionError(f"{path} answered {r.status_code} without an OpenAI error: {text[:300]}")
        raise JisuError(f"{r.status_code} {err.get('code')} {err.get('param')}")  # a 4xx: the outcome wanted
    return f"{r.status_code} {path}"


HARNESSES = [Harness("http", _setup, _strategy, _run, short_examples=80)]
