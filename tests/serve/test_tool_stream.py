"""serve/tools.StreamParser on text cut at every place: content before a call, the call announced
once its name is out, its arguments' text in pieces that join to the arguments, and the calls
sent whole where their text does not open with the name."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from jisu.serve.tools import StreamParser

TOOLS = [SimpleNamespace(function=SimpleNamespace(name=n)) for n in ("get_weather", "get_time")]


def run(text: str, seed: int) -> tuple[str, list[dict], int]:
    rng, p = random.Random(seed), StreamParser(TOOLS)
    content, deltas, i = "", [], 0
    while i < len(text):
        k = rng.randint(1, 5)
        c, d = p.push(text[i:i + k])
        content, deltas, i = content + c, deltas + d, i + k
    return content + p.flush(), deltas, p.num_calls


def joined(deltas: list[dict]) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        c = calls.setdefault(d["index"], {"name": None, "id": None, "arguments": "", "pieces": 0})
        if "id" in d:
            assert c["id"] is None, "a call announced twice"
            c["id"], c["name"] = d["id"], d["function"]["name"]
        if d["function"].get("arguments"):
            c["arguments"] += d["function"]["arguments"]
            c["pieces"] += 1
    return calls


@pytest.mark.parametrize("seed", range(12))
def test_arguments_arrive_in_pieces(seed):
    args = {"city": 'Pa"ris} </x>', "n": [1, {"a": [2, 3]}], "ok": True}
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(args) + "}\n</tool_call>"
    content, deltas, n = run(text, seed)
    assert content == "Let me check. " and n == 1
    assert deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all("id" not in d and "name" not in d["function"] for d in deltas[1:])
    (call,) = joined(deltas).values()
    assert json.loads(call["arguments"]) == args and call["pieces"] >= 2


@pytest.mark.parametrize("seed", range(6))
def test_several_calls_and_scalar_arguments(seed):
    text = ('<tool_call>\n{"name": "get_time", "arguments": 12}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": "x}"}\n</tool_call>')
    content, deltas, n = run(text, seed)
    calls = joined(deltas)
    assert n == 2 and content.strip() == ""
    assert (calls[0]["name"], calls[0]["arguments"]) == ("get_time", "12")
    assert (calls[1]["name"], json.loads(calls[1]["arguments"])) == ("get_weather", "x}")


@pytest.mark.parametrize("seed", range(4))
def test_calls_not_opening_with_the_name(seed):
    text = '<tool_call>{"arguments": {"tz": "UTC"}, "name": "get_time"}</tool_call>'
    content, deltas, n = run(text, seed)
    assert n == 1 and content == "" and len(deltas) == 1                 # sent whole when it closes
    assert deltas[0]["function"]["name"] == "get_time" and json.loads(deltas[0]["function"]["arguments"]) == {"tz": "UTC"}
    unknown = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    content, deltas, n = run(unknown, seed)
    assert (content, deltas, n) == (unknown, [], 0)                        # not a call of these tools: text
    assert run("no call <tool", seed)[:2] == ("no call <tool", [])
