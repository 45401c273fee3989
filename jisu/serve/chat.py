"""/v1/chat/completions: messages rendered with the model's chat template, `n` choices out, whole
or streamed as deltas, with chat logprobs, structured output (`response_format`) and tool calls
(`tools` / `tool_choice`, parsed by tools.py, streamed as `delta.tool_calls`); the n choices fork one
prefill, or with `use_beam_search` are the n best of best_of beams (engine/beam.py)."""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator

from fastapi import Request

from ..errors import JisuError
from . import tools as tool_calls
from .bridge import Group, event_stream, failure
from .logprobs import chat_logprobs
from .params import beam_width, check_max_tokens, check_model, check_prompt_ids, sampling_params
from .protocol import APIError, ChatCompletionRequest, new_id, now, sse, usage
from .state import ServerState
from .structured import compile_request


async def chat_completions(state: ServerState, req: ChatCompletionRequest, request: Request):
    ids = _prompt_ids(state, req)
    max_tokens = _max_tokens(state, req, len(ids))
    lp = (req.top_logprobs or 0) if req.logprobs else None
    grammar = await compile_request(state, req, chat=True)
    beams = beam_width(req)
    if beams == 1 and req.best_of not in (None, req.n):
        raise APIError(400, "best_of on chat completions needs use_beam_search", param="best_of")
    if beams > 1 and grammar is not None:
        raise APIError(400, "use_beam_search cannot be combined with response_format or tools", param="use_beam_search")
    group = Group(state)
    if beams > 1:
        group.submit(ids, sampling_params(state, req, max_tokens, 0, beams), logprobs=lp)
    else:
        params = [sampling_params(state, req, max_tokens, j) for j in range(req.n)]
        if grammar is not None:
            params = [dataclasses.replace(p, grammar=grammar) for p in params]
        group.submit_forks(ids, params, logprobs=lp)
    cid, created, model = new_id("chatcmpl"), now(), state.model_names[0]
    if req.stream:
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
        return event_stream(_stream(state, req, group, len(ids), head))
    results = list((await group.results(request, state.settings.poll_disconnect_s)).values())
    if results[0].sequences is not None:  # beam search: its n best
        seqs = results[0].sequences
        choices = [{"index": j, "message": {"role": "assistant", "content": q.text}, "logprobs": None,
                    "finish_reason": q.finish_reason} for j, q in enumerate(seqs)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage(len(ids), sum(len(q.token_ids) for q in seqs))}
    choices = [{"index": j, "message": _message(req, r.text),
                "logprobs": chat_logprobs(state, r.logprobs) if req.logprobs else None,
                "finish_reason": _finish(req, r.text, r.finish_reason)} for j, r in enumerate(results)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(len(ids), sum(r.num_generated_tokens for r in results))}


def _uses_tools(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def _message(req: ChatCompletionRequest, text: str) -> dict:
    if not _uses_tools(req):
        return {"role": "assistant", "content": text}
    parsed = tool_calls.parse(text, req.tools)
    msg = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        msg["tool_calls"] = parsed.calls
    return msg


def _finish(req: ChatCompletionRequest, text: str, reason: str | None) -> str | None:
    if reason == "stop" and _uses_tools(req) and tool_calls.parse(text, req.tools).calls:
        return "tool_calls"
    return reason


def _prompt_ids(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    """The messages rendered with the chat template and tokenized, after checking what is supported."""
    check_model(state, req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tok = state.llm.tokenizer
    if not tok.chat_template:
        raise APIError(400, "the model has no chat template; use /v1/completions", param="messages")
    messages, context = tool_calls.chat_messages(req, _uses_tools(req), tok.chat_template)
    try:
        ids = tok.encode_chat(messages, **context)
    except JisuError as e:
        raise APIError(400, str(e), param="messages") from None
    check_prompt_ids(state, ids)
    return ids


def _max_tokens(state: ServerState, req: ChatCompletionRequest, num_prompt: int) -> int:
    """max_completion_tokens, or the older max_tokens, or by default the rest of the context."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = state.engine.max_context - num_prompt
        if max_tokens < 1:
            raise APIError(400, f"the messages take {num_prompt} tokens, the whole context of "
                                f"{state.engine.max_context}", param="messages")
    check_max_tokens(state, num_prompt, max_tokens, allow_zero=False, param=param)
    return max_tokens


async def _stream(state: ServerState, req: ChatCompletionRequest, group: Group, num_prompt: int,
                  head: dict) -> AsyncIterator[str]:
    index = {rid: j for j, rid in enumerate(group.ids)}
    parsers = [tool_calls.StreamParser(req.tools) if _uses_tools(req) else None for _ in group.ids]
    completion_tokens = 0

    def chunk(j: int, delta: dict, reason=None, logprobs=None) -> str:
        return sse({**head, "choices": [{"index": j, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]})

    try:
        for j in range(len(group.ids)):
            yield chunk(j, {"role": "assistant", "content": ""})
        while not group.finished:
            out = await group.next()
            j = index[out.request_id]
            err = failure(out)
            if err is not None:
                yield sse(err.body())
                continue
            lp = chat_logprobs(state, out.logprobs) if req.logprobs and out.logprobs else None
            text, calls, parser = out.text, [], parsers[j]
            if parser is not None:
                text, calls = parser.push(out.text)
                if out.finished:
                    text += parser.flush()
            if text or lp:
                yield chunk(j, {"content": text}, None, lp)
            for c in calls:                  # a call announced, a piece of its arguments, or a whole call
                yield chunk(j, {"tool_calls": [c]})
            if out.finished:
                completion_tokens += out.num_generated_tokens
                reason = out.finish_reason
                if reason == "stop" and parser is not None and parser.num_calls:
                    reason = "tool_calls"
                yield chunk(j, {}, reason)
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(num_prompt, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        group.abort()
