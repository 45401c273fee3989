"""Structured output and tool calls over HTTP against `jisu serve` (in-process uvicorn on
127.0.0.1, the default model): the openai client's parse() helpers, a tool-calling round trip,
every tool_choice, streamed delta.tool_calls, the 400s for unsupported keywords and slow schemas,
and /openapi.json and /docs."""
from __future__ import annotations

import json

import httpx
import pytest

from jisu.serve.app import create_app
from tests.serve.conftest import running

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pydantic = pytest.importorskip("pydantic")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(default_gguf):
    import jisu

    app = create_app(jisu.load(default_gguf), kv_memory_mb=32, max_concurrency=8)
    with running(app) as (url, srv):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def _model(client) -> str:
    return client.models.list().data[0].id


def _check_call(call, tools=(WEATHER, TIME)):
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])
    assert call.type == "function" and call.id.startswith("call_")


@pytest.mark.e2e
def test_parse_with_pydantic_model(client):
    class Step(pydantic.BaseModel):
        explanation: str = pydantic.Field(max_length=60)
        output: str = pydantic.Field(max_length=30)

    class MathReasoning(pydantic.BaseModel):
        steps: list[Step] = pydantic.Field(max_length=3)
        final_answer: str = pydantic.Field(max_length=20)

    r = client.chat.completions.parse(model=_model(client), response_format=MathReasoning, max_tokens=300,
                                      temperature=0, messages=[
                                          {"role": "system", "content": "You are a helpful math tutor."},
                                          {"role": "user", "content": "solve 8x + 7 = -23"}])
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, MathReasoning) and r.choices[0].finish_reason == "stop"


@pytest.mark.e2e
def test_json_modes(client):
    model = _model(client)
    r = client.chat.completions.create(model=model, messages=ASK, max_tokens=100, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"},
                                               "temp_c": {"type": "integer", "minimum": -50, "maximum": 60}},
              "required": ["city", "sunny", "temp_c"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=model, messages=ASK, max_tokens=100, temperature=0.7, seed=3, n=3,
                                       response_format=fmt)
    for ch in r.choices:
        jsonschema.validate(json.loads(ch.message.content), schema)
    streamed = client.chat.completions.create(model=model, messages=ASK, max_tokens=100, temperature=0,
                                              response_format=fmt, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)), schema)
    c = client.completions.create(model=model, prompt="A city and its country as JSON:", max_tokens=100, temperature=0,
                                  extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(c.choices[0].text), schema)


@pytest.mark.e2e
def test_tool_calling_round_trip(client):
    model = _model(client)
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=100, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _check_call(call)
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21, "sky": "clear"})}]
    r2 = client.chat.completions.create(model=model, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                        max_tokens=40, temperature=0)
    assert r2.choices[0].message.content and not r2.choices[0].message.tool_calls
    assert r2.choices[0].finish_reason in ("stop", "length")


@pytest.mark.e2e
def test_tool_choice_variants(client):
    model = _model(client)
    named = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=100,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0)
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"] and named.choices[0].finish_reason == "tool_calls"
    _check_call(calls[0])
    # auto: an answer or valid calls (the sampled choices see both sides of the grammar)
    auto = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="auto",
                                          max_tokens=60, temperature=1.0, seed=5, n=4)
    for ch in auto.choices:
        if ch.message.tool_calls:
            assert ch.finish_reason == "tool_calls"
            for c in ch.message.tool_calls:
                _check_call(c)
        else:
            assert ch.message.content and "<tool_call>" not in ch.message.content
    none = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=20, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    # parallel calls: one or more, each valid
    many = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                          parallel_tool_calls=True, max_tokens=200, temperature=0)
    assert 1 <= len(many.choices[0].message.tool_calls) <= 4
    for c in many.choices[0].message.tool_calls:
        _check_call(c)
    # the openai helper parses arguments into the function's pydantic model
    class GetWeather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=30)
        unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")

    p = client.chat.completions.parse(model=model, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
                                      tool_choice="required", max_tokens=100, temperature=0)
    assert isinstance(p.choices[0].message.tool_calls[0].function.parsed_arguments, GetWeather)


@pytest.mark.e2e
def test_streamed_tool_calls(client):
    model = _model(client)
    whole = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=100, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 max_tokens=100, temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


@pytest.mark.e2e
def test_streamed_tool_call_arguments_arrive_in_pieces(client):
    """As OpenAI streams a call: its index, id, type and name first (arguments ""), then the
    arguments' text in several pieces that carry neither id nor name; the openai client's stream
    helper puts them back together."""
    model = _model(client)
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 max_tokens=100, temperature=0, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    head, pieces = deltas[0], deltas[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather" and head.function.arguments == ""
    assert len(pieces) >= 3 and all(p.index == 0 and p.id is None and p.function.name is None for p in pieces)
    assert all(p.function.arguments for p in pieces)
    args = "".join(p.function.arguments for p in pieces)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])

    with client.chat.completions.stream(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                        max_tokens=100, temperature=0) as stream:
        events = [e for e in stream if e.type.startswith("tool_calls.function.arguments")]
        final = stream.get_final_completion()
    assert sum(e.type == "tool_calls.function.arguments.delta" for e in events) >= 3
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].name == "get_weather" and json.loads(done[0].arguments) == json.loads(args)
    call = final.choices[0].message.tool_calls[0]
    _check_call(call)
    assert json.loads(call.function.arguments) == json.loads(args) and final.choices[0].finish_reason == "tool_calls"


def _post(url, body):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


@pytest.mark.e2e
def test_schema_errors_are_400(server, monkeypatch):
    r = _post(server, {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}}}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "response_format" and "dependentSchemas" in err["message"]
    from jisu.engine import structured as es
    from tests.engine.test_structured import slow_schema

    monkeypatch.setattr(es, "COMPILE_TIMEOUT_S", 0.05)   # the schema takes ~0.5 s on an idle machine
    r = _post(server, {"messages": ASK, "max_tokens": 5,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "slow", "schema": slow_schema(200)}}})
    assert r.status_code == 400 and "longer than 0.05 s" in r.json()["error"]["message"]
    for body, param in [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                               "dependentRequired": {}}}}]}, "tools"),
        # compiles, but admits no document (it recurses forever): found by the json_schema fuzz harness
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "loop", "schema": {"$ref": "#"}}}},
         "response_format"),
    ]:
        r = _post(server, {"messages": ASK, "max_tokens": 5, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


@pytest.mark.e2e
def test_openapi_and_docs(server):
    spec = httpx.get(server + "/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                 "/detokenize", "/tokenizer_info"):
        assert path in paths, path
    schemas = spec["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("messages", "response_format", "tools", "tool_choice", "parallel_tool_calls", "max_tokens",
                  "temperature", "stream", "logprobs", "top_logprobs", "seed", "stop", "n"):
        assert field in chat, field
    assert "schema" in schemas["JSONSchemaFormat"]["properties"]
    body = paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatCompletionRequest")
    ok = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert "400" in paths["/v1/chat/completions"]["post"]["responses"]
    assert "tool_calls" in json.dumps(schemas["ChatCompletion"]) or "tool_calls" in json.dumps(schemas)
    docs = httpx.get(server + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text
