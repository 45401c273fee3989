"""/v1/chat/completions: messages rendered with the model's chat template, `n` choices out, whole
or streamed as deltas, with chat logprobs; the n choices fork one prefill, or with `use_beam_search`
are the n best of best_of beams (engine/beam.py)."""
from __future__ import annotations

from typing import AsyncIterator

from fastapi import Request

from ..errors import JisuError
from .bridge import Group, event_stream, failure
from .logprobs import chat_logprobs
from .params import beam_width, check_max_tokens, check_model, check_prompt_ids, sampling_params
from .protocol import APIError, ChatCompletionRequest, new_id, now, sse, usage
from .state import ServerState


async def chat_completions(state: ServerState, req: ChatCompletionRequest, request: Request):
    ids = _prompt_ids(state, req)
    max_tokens = _max_tokens(state, req, len(ids))
    lp = (req.top_logprobs or 0) if req.logprobs else None
    beams = beam_width(req)
    if beams == 1 and req.best_of not in (None, req.n):
        raise APIError(400, "best_of on chat completions needs use_beam_search", param="best_of")
    group = Group(state)
    if beams > 1:
        group.submit(ids, sampling_params(state, req, max_tokens, 0, beams), logprobs=lp)
    else:
        group.submit_forks(ids, [sampling_params(state, req, max_tokens, j) for j in range(req.n)], logprobs=lp)
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
    choices = [{"index": j, "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(state, r.logprobs) if req.logprobs else None,
                "finish_reason": r.finish_reason} for j, r in enumerate(results)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(len(ids), sum(r.num_generated_tokens for r in results))}


def _prompt_ids(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    """The messages rendered with the chat template and tokenized, after checking what is supported."""
    check_model(state, req.model)
    if req.tools:
        raise APIError(400, "tools are not supported", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    tok = state.llm.tokenizer
    if not tok.chat_template:
        raise APIError(400, "the model has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    try:
        ids = tok.encode_chat(messages)
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
            if out.text or lp:
                yield chunk(j, {"content": out.text}, None, lp)
            if out.finished:
                completion_tokens += out.num_generated_tokens
                yield chunk(j, {}, out.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(num_prompt, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        group.abort()
