"""Harnesses over the structured-output inputs a client supplies: JSON schemas (`response_format`,
`--json-schema`) built from the keywords the field uses, nested and mixed with hostile values
(recursive and dangling `$ref`s, catastrophic patterns, huge bounds, unknown keywords), and
`tools` lists (function names, parameter schemas, `tool_choice`). Property: the grammar compiles
and its first mask is made, or a one-line error (the server's 400) — never an exception, a
crash or a hang (the case timer catches a slow compile)."""
from __future__ import annotations

from hypothesis import strategies as st

from .core import Harness
from .values import json_value

_TYPES = ["object", "array", "string", "integer", "number", "boolean", "null", "x", ["string", "null"]]
_PATTERNS = ["^[a-z]+$", "(a+)+$", "(a|aa)*b", "[", "\\", "\\d{3}-\\d{4}", ".*", "(?=a)", "(?P<n>a)", "a{99999}",
             "[^\\x00-\\x7f]", "\\p{L}+", "", "((((((((((a))))))))))*", "[z-a]"]
_FORMATS = ["date-time", "date", "time", "email", "uuid", "uri", "ipv4", "hostname", "regex", "x"]
_NAMES = st.one_of(st.sampled_from(["a", "b", "name", "$ref", "", "\ud800", "a" * 200, "properties"]),
                   st.text(max_size=6))
_BIG = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30, 1e308, float("inf"), float("nan"), 0.5]),
                 st.integers(-3, 50))


def _leaf():
    plain = st.fixed_dictionaries({"type": st.sampled_from(_TYPES)}, optional={
        "enum": st.lists(st.one_of(_NAMES, st.integers(), st.none(), st.booleans()), max_size=5),
        "const": json_value(), "pattern": st.sampled_from(_PATTERNS), "format": st.sampled_from(_FORMATS),
        "minLength": _BIG, "maxLength": _BIG, "minimum": _BIG, "maximum": _BIG, "exclusiveMinimum": _BIG,
        "multipleOf": _BIG, "minItems": _BIG, "maxItems": _BIG, "default": json_value(),
        "description": st.text(max_size=8)})
    ref = st.fixed_dictionaries({"$ref": st.sampled_from(["#", "#/$defs/a", "#/$defs/missing", "#/definitions/a",
                                                          "http://example.com/s.json", "#/properties/a", "x"])})
    return st.one_of(plain, plain, plain, ref, st.booleans(), json_value())


def _node(inner):
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("object")}, optional={
            "properties": st.dictionaries(_NAMES, inner, max_size=4), "required": st.lists(_NAMES, max_size=4),
            "additionalProperties": st.one_of(st.booleans(), inner), "patternProperties": st.dictionaries(
                st.sampled_from(_PATTERNS), inner, max_size=2), "minProperties": _BIG, "maxProperties": _BIG}),
        st.fixed_dictionaries({"type": st.just("array")}, optional={
            "items": st.one_of(inner, st.lists(inner, max_size=3)), "prefixItems": st.lists(inner, max_size=3),
            "minItems": _BIG, "maxItems": _BIG, "uniqueItems": st.booleans(), "contains": inner}),
        st.fixed_dictionaries({k: st.lists(inner, min_size=0, max_size=4)
                               for k in ("anyOf",)}, optional={"oneOf": st.lists(inner, max_size=3),
                                                              "allOf": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"not": inner}), st.fixed_dictionaries({"if": inner, "then": inner}, optional={
            "else": inner}),
        st.dictionaries(_NAMES, inner, max_size=3),   # unknown keywords beside nothing known
    )


def _schema():
    body = st.recursive(_leaf(), _node, max_leaves=12)
    with_defs = st.fixed_dictionaries({"$defs": st.dictionaries(st.sampled_from(["a", "b"]), body, max_size=2)},
                                      optional={"type": st.just("object"),
                                                "properties": st.dictionaries(_NAMES, body, max_size=3),
                                                "$ref": st.sampled_from(["#/$defs/a", "#/$defs/b"])})
    return st.one_of(body, body, with_defs)


def _schema_setup(workdir: str) -> dict:
    import os

    from tokenizers import Tokenizer as HFTokenizer

    from jisu.io.tokenizer import Tokenizer
    from tests.fixtures import save_tokenizer

    save_tokenizer(workdir, chat=True)
    hf = HFTokenizer.from_file(os.path.join(workdir, "tokenizer.json"))
    tok = Tokenizer(hf, bos_id=1, eos_ids=[2], add_bos=False, chat_template=None, source="fuzz")
    return {"tok": tok, "vocab": hf.get_vocab_size(with_added_tokens=True)}


def _compile_and_mask(ctx, grammar) -> str:
    from jisu.engine.structured import Constraint

    c = Constraint(grammar, ctx["tok"], ctx["vocab"], eos_ids=[2], overlap=False)
    n = int(c.allowed().sum())
    return "compiled, " + ("no token allowed" if n == 0 else "tokens allowed")


def _schema_strategy(ctx):
    return st.one_of(_schema(), _schema().map(lambda s: ["text", s]))


def _schema_run(ctx, case) -> str:
    import json

    from jisu.engine.structured import json_schema_grammar

    if isinstance(case, list) and len(case) == 2 and case[0] == "text":   # the schema as JSON text
        try:
            text = json.dumps(case[1])
        except ValueError:
            text = "{"
        return _compile_and_mask(ctx, json_schema_grammar(text, "response_format"))
    return _compile_and_mask(ctx, json_schema_grammar(case, "response_format"))


def _tools_strategy(ctx):
    # mostly bodies the request schema accepts (their parameter schemas and choices are the hostile
    # part); some tools and choices of any shape
    params = _schema().filter(lambda x: isinstance(x, dict))
    name = st.sampled_from(["a", "b", "get_weather", "x_1", "a" * 64])
    fn = st.fixed_dictionaries({"name": name}, optional={"description": st.text(max_size=8), "parameters": params})
    tool = st.fixed_dictionaries({"type": st.just("function"), "function": fn})
    choice = st.one_of(st.sampled_from(["none", "auto", "required"]), st.none(),
                       st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
                           {"name": name})}))
    anything = st.tuples(st.lists(st.one_of(tool, json_value()), max_size=3), st.one_of(choice, json_value()))
    return st.one_of(st.tuples(st.lists(tool, min_size=1, max_size=3), choice),
                     st.tuples(st.lists(tool, min_size=1, max_size=3), choice), anything).map(list)


def _tools_run(ctx, case) -> str:
    from pydantic import ValidationError

    from jisu.errors import InputError
    from jisu.serve import tools
    from jisu.serve.protocol import APIError, ChatCompletionRequest
    from jisu.serve.structured import request_grammar

    tool_list, choice = case
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": tool_list}
    if choice is not None:
        body["tool_choice"] = choice
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:       # the server's 400 for a body its schema refuses
        raise InputError(f"request: {len(e.errors())} validation error(s)") from None
    try:
        grammar, _ = request_grammar(req, chat=True)   # what the server compiles for the request
    except APIError as e:
        if not 400 <= e.status < 500:
            raise
        raise InputError(f"{e.status}: {e}") from None
    if grammar is None:
        return "no grammar"
    out = _compile_and_mask(ctx, grammar)
    tools.parse('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>', req.tools)
    return out


HARNESSES = [
    Harness("json_schema", _schema_setup, _schema_strategy, _schema_run, short_examples=80),
    Harness("tools", _schema_setup, _tools_strategy, _tools_run, short_examples=60),
]
