"""Grammar-constrained decoding (engine/structured.py): every output on the schema set parses and
validates, near-miss documents are rejected token by token, compile errors name the keyword, the
caps hold, and the tokenizer bridge maps byte-level tokens to their bytes."""
from __future__ import annotations

import json

import pytest

from jisu.config import SamplingParams
from jisu.engine import structured as es
from jisu.engine.engine import Engine, EngineError
from tests.structured_schemas import SCHEMAS

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

MAX_TOKENS = 160


@pytest.fixture(scope="module")
def llm(default_gguf):
    """The default model as jisu.load() gives it (quantized weights, fp16 KV cache)."""
    import jisu

    return jisu.load(default_gguf)


def _validator(schema):
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_schema_set_is_varied():
    assert len(SCHEMAS) >= 50
    text = json.dumps([s for _, s, _ in SCHEMAS])
    for keyword in ('"anyOf"', '"oneOf"', '"allOf"', '"$ref"', '"enum"', '"format"', '"pattern"', '"minimum"',
                    '"items"', '"prefixItems"', '"const"', '"additionalProperties"'):
        assert keyword in text
    for _, schema, bad in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
        assert bad


def _prompt(llm, name, schema):
    return llm.tokenizer.encode_chat([{"role": "user", "content": f"Give an example of {name.replace('_', ' ')} as "
                                                                  f"JSON matching this schema: {json.dumps(schema)}"}])


@pytest.mark.e2e
def test_every_output_parses_and_validates(llm):
    engine = Engine.from_llm(llm, max_num_seqs=8, kv_memory_mb=64)
    prompts = [_prompt(llm, n, s) for n, s, _ in SCHEMAS]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, json_schema=s) for _, s, _ in SCHEMAS]
    results = engine.generate(prompts, params)
    failures = []
    for (name, schema, _), r in zip(SCHEMAS, results):
        try:
            assert r["finish_reason"] == "stop", r["finish_reason"]
            _validator(schema).validate(json.loads(r["text"]))
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append((name, r["text"][:120], str(e)[:120]))
    assert not failures, failures


@pytest.mark.e2e
def test_sampled_outputs_validate_batched_with_free_rows(llm):
    """Sampled constrained rows batched with unconstrained ones: each constrained output validates,
    and the free rows generate exactly what they generate alone."""
    engine = Engine.from_llm(llm, max_num_seqs=8, kv_memory_mb=64)
    picks = [SCHEMAS[i] for i in (16, 20, 27, 30, 40)]
    free = llm.tokenizer.encode_chat([{"role": "user", "content": "Name three colors."}])
    alone = engine.generate([free], SamplingParams(max_tokens=24, temperature=0))[0]["token_ids"]
    prompts = [free] + [_prompt(llm, n, s) for n, s, _ in picks] + [free]
    params = ([SamplingParams(max_tokens=24, temperature=0)]
              + [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=11, json_schema=s) for _, s, _ in picks]
              + [SamplingParams(max_tokens=24, temperature=0)])
    results = engine.generate(prompts, params)
    assert results[0]["token_ids"] == alone and results[-1]["token_ids"] == alone
    for (name, schema, _), r in zip(picks, results[1:-1]):
        assert r["finish_reason"] == "stop", (name, r["text"])
        _validator(schema).validate(json.loads(r["text"]))


@pytest.mark.e2e
@pytest.mark.parametrize("name,schema,bad", SCHEMAS, ids=[n for n, _, _ in SCHEMAS])
def test_near_misses_are_rejected(llm, name, schema, bad):
    """Each invalid document, as the model's tokens, is not a complete document of the grammar;
    a valid one is."""
    g = es.json_schema_grammar(schema)
    for doc in bad:
        assert not es.accepts(g, llm.tokenizer, doc, llm.config.vocab_size), doc
        try:
            parsed = json.loads(doc)
        except ValueError:
            continue
        fmt = schema.get("format") or json.dumps(schema).count('"format"')
        if not fmt:    # (jsonschema checks no date-time / time / uri formats without extra packages)
            assert not _validator(schema).is_valid(parsed), doc


@pytest.mark.e2e
def test_valid_documents_are_accepted(llm):
    g = es.json_schema_grammar(SCHEMAS[16][1])           # person
    assert es.accepts(g, llm.tokenizer, '{"name": "Ada", "age": 36}', llm.config.vocab_size)
    assert not es.accepts(g, llm.tokenizer, '{"name": "Ada", "age": 36', llm.config.vocab_size)  # unfinished
    anything = es.json_object_grammar()
    assert es.accepts(anything, llm.tokenizer, '{"a": [1, {"b": null}]}', llm.config.vocab_size)
    assert not es.accepts(anything, llm.tokenizer, '[1]', llm.config.vocab_size)


@pytest.mark.e2e
def test_unsupported_keyword_is_named(llm):
    g = es.json_schema_grammar({"type": "object", "dependentSchemas": {"a": {}}}, what="response_format")
    with pytest.raises(es.GrammarError, match="dependentSchemas"):
        es.check_grammar(g, llm.tokenizer, llm.config.vocab_size)
    engine = Engine.from_llm(llm, max_num_seqs=1, kv_memory_mb=8)
    with pytest.raises(EngineError, match="dependentSchemas"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, json_schema={"dependentSchemas": {"a": {}}}))
    with pytest.raises(EngineError, match="ignore_eos"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True, json_schema={"type": "object"}))


def test_size_cap_and_bad_schemas():
    with pytest.raises(es.GrammarError, match="limit"):
        es.json_schema_grammar({"enum": ["x" * 100] * (es.MAX_GRAMMAR_BYTES // 100 + 1)})
    with pytest.raises(es.GrammarError, match="not valid JSON"):
        es.json_schema_grammar("{nope")
    with pytest.raises(es.GrammarError, match="JSON object"):
        es.json_schema_grammar([1, 2])
    with pytest.raises(es.GrammarError, match="not both"):
        es.as_grammar({"type": "object"}, "start: /a/")


def slow_schema(n: int = 150) -> dict:
    """A schema whose matcher takes seconds to build: n alternative objects of 40 properties each."""
    return {"anyOf": [{"type": "object", "properties": {f"p{i}_{j}": {"type": "string"} for j in range(40)},
                       "required": [f"p{i}_0"]} for i in range(n)]}


@pytest.mark.e2e
def test_compile_time_cap(llm):
    """A schema whose build runs past the cap is refused, in about the cap (the schema takes ~0.25 s
    to build on an idle machine, 5x the cap used here)."""
    import time

    g = es.json_schema_grammar(slow_schema(), what="response_format")
    lltok = es.ll_tokenizer(llm.tokenizer, llm.config.vocab_size)
    t0 = time.perf_counter()
    with pytest.raises(es.GrammarError, match="response_format: compiling the schema took longer than 0.05 s"):
        es.compile_matcher(g, lltok, timeout_s=0.05)
    assert time.perf_counter() - t0 < 1.5


@pytest.mark.e2e
def test_tokenizer_bridge_bytes(llm):
    """Byte-level BPE stand-ins map to their bytes ('Ġ' is a space, 'Ċ' a newline), so the bytes of
    a text's tokens are the text's UTF-8 bytes; the bytes-built llguidance tokenizer agrees with
    the one built from the tokenizer's JSON."""
    import llguidance

    tok = llm.tokenizer
    text = 'Héllo {"a": 1}\n\tdéjà vu — 東京'
    ids = tok.encode(text, add_bos=False)
    assert b"".join(es.token_bytes(tok, i) for i in ids) == text.encode("utf-8")
    lt = es.ll_tokenizer(tok, llm.config.vocab_size)
    assert lt.decode_bytes(ids) == text.encode("utf-8")
    wrapped = llguidance.LLTokenizer(llguidance.TokenizerWrapper(es._BytesTokenizer(tok, list(llm.eos_ids))),
                                     n_vocab=llm.config.vocab_size)
    assert wrapped.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.e2e
def test_python_api_json_schema(llm):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
              "required": ["city", "population"], "additionalProperties": False}
    c = llm.chat([{"role": "user", "content": "The biggest city of France, as JSON."}], max_tokens=60, temperature=0,
                 json_schema=schema)
    _validator(schema).validate(json.loads(c.text))
    g = llm.generate("A JSON list of two primes:", max_tokens=30, temperature=0,
                     grammar='start: "[" NUM ", " NUM "]"\nNUM: /[0-9]{1,3}/')
    assert json.loads(g.text) and len(json.loads(g.text)) == 2


@pytest.mark.e2e
def test_cli_json_schema(tmp_path, default_gguf, capsys):
    from jisu.cli import main

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
              "required": ["color", "hex"], "additionalProperties": False}
    good, bad = tmp_path / "schema.json", tmp_path / "bad.json"
    good.write_text(json.dumps(schema))
    bad.write_text(json.dumps({"type": "object", "dependentSchemas": {}}))
    assert main(["run", default_gguf, "-p", "Pick a color as JSON", "--temp", "0", "-n", "60",
                 "--json-schema", str(good)]) == 0
    _validator(schema).validate(json.loads(capsys.readouterr().out))
    assert main(["run", default_gguf, "-p", "x", "--json-schema", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dependentSchemas" in err
    (tmp_path / "broken.json").write_text("{nope")
    assert main(["run", default_gguf, "-p", "x", "--json-schema", str(tmp_path / "broken.json")]) == 2
    assert "--json-schema" in capsys.readouterr().err
