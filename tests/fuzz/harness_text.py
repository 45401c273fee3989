"""Harnesses over text a user or a model file supplies: chat templates (rendered in the sandbox
with hostile messages) and compression recipe strings."""
from __future__ import annotations

from hypothesis import strategies as st

from .core import Harness

# Template fragments: real HF template idioms, sandbox escapes, and plain breakage.
_FRAGMENTS = [
    "{% for m in messages %}", "{% endfor %}", "{% if add_generation_prompt %}", "{% endif %}", "{% else %}",
    "{{ m['role'] }}", "{{ m['content'] }}", "{{ m.content | trim }}", "{{ messages[0]['content'] }}",
    "{{ bos_token }}", "{{ eos_token }}", "<|im_start|>", "\n", "{{ raise_exception('no') }}",
    "{% set x = messages | length %}", "{{ x * 3 }}", "{{ m | tojson }}", "{{ strftime_now('%Y') }}",
    "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.__class__ }}", "{{ range(10) | list }}", "{% for i in range(100000) %}{% endfor %}",
    "{{ 'a' * 1000 }}", "{{ m['missing'] }}", "{{ m.content.upper() }}", "{% macro f() %}x{% endmacro %}{{ f() }}",
    "{% break %}", "{% continue %}", "{{ 1 / 0 }}", "{{ (messages | first).role }}", "{%", "{{", "}}", "%}",
    "{# c #}", "{% raw %}", "{% endraw %}", "{{ m['content'][::-1] }}", "{{ messages | selectattr('role') | list }}",
    "{{ 9 ** 9 ** 9 }}", "{{ 'x' * 9999999999 }}", "{% include 'x' %}", "{% import 'os' as os %}",
    "{{ lipsum() }}", "{{ namespace(a=1).a }}", "{{ dict(a=1).items() | list }}",
]

_MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]),
                                                     st.text(max_size=5), st.integers()),
                                  "content": st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "{{ 1 }}"]),
                                                       st.none(), st.lists(st.text(max_size=3), max_size=2))},
                                 optional={"name": st.text(max_size=5)})


def _template_strategy(ctx):
    template = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=8)), min_size=1, max_size=12).map(
        "".join)
    return st.tuples(template, st.lists(_MESSAGE, max_size=3), st.booleans()).map(list)


def _template_run(ctx, case) -> str:
    from jisu.io.tokenizer import Tokenizer
    from tests.fixtures import SPECIALS

    template, messages, gen = case
    tok = Tokenizer(ctx["hf"], bos_id=1, eos_ids=[2], add_bos=False, chat_template=template, source="fuzz")
    text = tok.render_chat(messages, add_generation_prompt=gen)
    tok.encode(text)
    return "rendered" + (" with specials" if any(s in text for s in SPECIALS) else "")


def _template_setup(workdir: str) -> dict:
    import os

    from tokenizers import Tokenizer as HFTokenizer

    from tests.fixtures import save_tokenizer

    save_tokenizer(workdir, chat=True)
    return {"hf": HFTokenizer.from_file(os.path.join(workdir, "tokenizer.json"))}


# Recipe pieces: every step, format and option the grammar knows, and near misses.
_RECIPE = ["rtn", "awq", "gptq", "nf4", "kmeans", "mixed", ":", ":", "+", "+", ",", "=", "w4g32", "w8", "w4g128a",
           "w3g64", "w2g16", "w4", "g32", "g64", "g0", "a", "damp=0.01", "damp=nan", "damp=1e400", "bpw=4.0",
           "bpw=inf", "bpw=-1", "max=8", "w4", "groups", "act_order", "embed=w8", "head=w4g32", "tune=3",
           "tune=99999999999", "tune=-1", "tune=1.5", "none", "fp16", "int8", " ", "\x00", "\ud800", "1e999", "0x10"]


def _recipe_strategy(ctx):
    return st.one_of(st.lists(st.sampled_from(_RECIPE), max_size=10).map("".join), st.text(max_size=20))


def _recipe_run(ctx, text: str) -> str:
    from jisu.compress.recipe import parse_recipe

    r = parse_recipe(text)
    r.to_dict()
    r.needs_calibration
    if r.quant.method == "mixed":
        r.quant.mixed_choices
    return "parsed " + r.quant.method


HARNESSES = [
    Harness("chat_template", _template_setup, _template_strategy, _template_run, short_examples=150),
    Harness("recipe", lambda w: {}, _recipe_strategy, _recipe_run, short_examples=300),
]
