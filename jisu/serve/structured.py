"""The grammar a request imposes (`response_format`, `tools` / `tool_choice`), compiled off the
event loop under the engine's caps; what cannot be compiled is a 400 naming the parameter."""
from __future__ import annotations

import asyncio

from ..engine import structured as es
from ..errors import JisuError
from . import tools as tool_calls
from .protocol import APIError


def answer_schema(response_format) -> dict | None:
    """The JSON Schema of the answer that `response_format` asks for (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    return response_format.json_schema.schema_ or {}


def request_grammar(req, *, chat: bool) -> tuple[es.Grammar | None, str]:
    """The request's grammar (None: unconstrained) and the parameter it comes from."""
    schema = answer_schema(getattr(req, "response_format", None))
    if chat and req.tools and (req.tool_choice or "auto") != "none":
        names = {t.function.name for t in req.tools}
        choice = req.tool_choice
        if not isinstance(choice, str) and choice is not None and choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function `{choice.function.name}`, which is not among "
                                f"the tools", param="tool_choice")
        if len(names) != len(req.tools):
            raise APIError(400, "tools: function names must be unique", param="tools")
        try:
            return es.lark_grammar(tool_calls.lark(req, schema), what="tools"), "tools"
        except es.GrammarError as e:
            raise APIError(400, str(e), param="tools") from None
    if chat and req.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if schema is None:
        return None, "response_format"
    try:
        return es.json_schema_grammar(schema, what="response_format"), "response_format"
    except es.GrammarError as e:
        raise APIError(400, str(e), param="response_format") from None


async def compile_request(state, req, *, chat: bool) -> es.Grammar | None:
    """The request's grammar, compiled (and cached) on a worker thread within the compile cap."""
    try:
        grammar, param = request_grammar(req, chat=chat)
    except JisuError as e:           # llguidance is missing
        raise APIError(501, str(e), param="response_format", code="not_implemented") from None
    if grammar is None:
        return None
    engine = state.engine
    try:
        await asyncio.to_thread(es.check_grammar, grammar, state.llm.tokenizer, engine.vocab_size, engine.eos_ids)
    except es.GrammarError as e:
        raise APIError(400, str(e), param=param, code="invalid_schema") from None
    except JisuError as e:           # llguidance is missing
        raise APIError(501, str(e), param=param, code="not_implemented") from None
    return grammar
