"""/v1/completions: text or token-id prompts in, `n` choices per prompt out, whole or streamed, with
`echo`, legacy logprobs, scoring (echo with max_tokens 0), `best_of` (candidates forked from one prefill,
ranked by engine/search.py), `use_beam_search` (engine/beam.py: best_of beams, the n best returned)
and structured output (`response_format`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Request

from ..engine.search import best_of_n, cumulative_logprob
from ..errors import JisuError
from .bridge import Finished, Group, event_stream, failure
from .logprobs import LegacyLogprobs, merge_legacy
from .params import beam_width, check_max_tokens, check_model, check_prompt_ids, sampling_params
from .protocol import APIError, CompletionRequest, new_id, now, sse, usage
from .state import ServerState
from .structured import compile_request


@dataclass
class _Prompts:
    """The prompts of one request, as token ids and as the text `echo` gives back."""
    ids: list[list[int]]        # the token ids of each prompt
    texts: list[str | None]     # each prompt's text as sent (None: sent as token ids)
    tokenizer: Any              # decodes the prompts sent as token ids

    def echo(self, i: int) -> str:
        t = self.texts[i]
        return t if t is not None else self.tokenizer.decode(self.ids[i])

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.ids)


async def completions(state: ServerState, req: CompletionRequest, request: Request):
    check_model(state, req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = _prompts(state, req)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for ids in prompts.ids:
        check_max_tokens(state, len(ids), max_tokens, allow_zero=req.echo, param="max_tokens")
    beams = beam_width(req)
    best_of = _best_of(state, req, len(prompts.ids)) if beams == 1 else 1
    grammar = await compile_request(state, req, chat=False) if max_tokens else None
    if beams > 1 and grammar is not None:
        raise APIError(400, "use_beam_search cannot be combined with response_format", param="use_beam_search")
    group = Group(state)
    if beams > 1:  # one beam search per prompt, its n best sequences the choices
        rids = [[group.submit(ids, sampling_params(state, req, max_tokens, 0, beams), max_new_tokens=max_tokens,
                              logprobs=req.logprobs)] for ids in prompts.ids]
    else:
        rids = _submit(state, req, group, prompts, max_tokens, best_of, grammar)
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_names[0]}
    if req.stream:
        return event_stream(_stream(state, req, group, rids, prompts, head))
    results = await group.results(request, state.settings.poll_disconnect_s)
    return _body(state, req, prompts, rids, results, head)


def _prompts(state: ServerState, req: CompletionRequest) -> _Prompts:
    """The request's prompts (a text, a list of token ids, or a list of either), checked."""
    p = req.prompt
    given = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    prompts = _Prompts([], [], state.llm.tokenizer)
    for pr in given:
        if isinstance(pr, str):
            if not pr:
                raise APIError(400, "the prompt is empty", param="prompt")
            try:
                ids, text = state.llm.tokenizer.encode(pr), pr
            except JisuError as e:  # a lone surrogate, ...
                raise APIError(400, str(e), param="prompt") from None
        else:
            ids, text = list(pr), None
        check_prompt_ids(state, ids)
        prompts.ids.append(ids)
        prompts.texts.append(text)
    return prompts


def _best_of(state: ServerState, req: CompletionRequest, num_prompts: int) -> int:
    n, best_of = req.n, req.best_of or req.n
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be >= n ({n})", param="best_of")
    if req.stream and best_of > n:
        raise APIError(400, "best_of > n cannot be streamed", param="best_of")
    if num_prompts * best_of > state.engine.max_queue:
        raise APIError(400, f"{num_prompts} prompts x best_of {best_of} exceeds the server's queue", param="n")
    return best_of


def _submit(state: ServerState, req: CompletionRequest, group: Group, prompts: _Prompts, max_tokens: int,
            best_of: int, grammar=None) -> list[list[str]]:
    """Submits `best_of` candidates per prompt; returns their engine request ids, by prompt."""
    want = req.logprobs
    scoring = max_tokens == 0       # echo with max_tokens 0: the prompt's log-probabilities only
    # ranking candidates needs their log-probabilities even where the client asks for none
    logprobs = None if scoring else (want if want is not None else (0 if best_of > req.n else None))
    prompt_logprobs = (want if want is not None else 0) if req.echo and (want is not None or scoring) else None

    def params(j: int):
        p = sampling_params(state, req, max_tokens, j)
        return p if grammar is None else dataclasses.replace(p, grammar=grammar)

    # the candidates of a prompt share its prefill (forks of its KV blocks) unless each scores the prompt
    return [group.submit_forks(ids, [params(j) for j in range(best_of)],
                               max_new_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
            for ids in prompts.ids]


def _body(state: ServerState, req: CompletionRequest, prompts: _Prompts, rids: list[list[str]],
          results: dict[str, Finished], head: dict) -> dict:
    """The whole (non-streamed) response: the best `n` candidates of each prompt."""
    choices, completion_tokens = [], 0
    for pi, cands in enumerate(rids):
        completion_tokens += sum(results[rid].num_generated_tokens for rid in cands)
        seqs = results[cands[0]].sequences
        if seqs is not None:  # beam search
            completion_tokens += sum(len(q.token_ids) for q in seqs[1:])
            choices += [{"index": pi * req.n + k, "text": prompts.echo(pi) + q.text if req.echo else q.text,
                         "logprobs": None, "finish_reason": q.finish_reason} for k, q in enumerate(seqs)]
            continue
        if len(cands) > req.n:
            keep = best_of_n([cumulative_logprob(results[rid].logprobs) for rid in cands], req.n)
            cands = [cands[i] for i in keep]
        for k, rid in enumerate(cands):
            r = results[rid]
            lp = None
            if req.logprobs is not None:
                builder = LegacyLogprobs(state)
                lp = builder.echo(prompts.ids[pi], r.prompt_logprobs, prompts.echo(pi)) if req.echo else None
                lp = merge_legacy(lp, builder.tokens(r.logprobs))
            choices.append({"index": pi * req.n + k, "text": prompts.echo(pi) + r.text if req.echo else r.text,
                            "logprobs": lp, "finish_reason": r.finish_reason})
    return {**head, "choices": choices, "usage": usage(prompts.num_tokens, completion_tokens)}


async def _stream(state: ServerState, req: CompletionRequest, group: Group, rids: list[list[str]],
                  prompts: _Prompts, head: dict) -> AsyncIterator[str]:
    where = {rid: (pi, j) for pi, row in enumerate(rids) for j, rid in enumerate(row)}
    builders = {rid: LegacyLogprobs(state) for rid in where}
    echoed: set[str] = set()
    completion_tokens = 0
    try:
        while not group.finished:
            out = await group.next()
            rid = out.request_id
            pi, j = where[rid]
            text, lp = out.text, None
            # with logprobs the echo waits for the prompt's log-probabilities, which come with the first token
            if req.echo and rid not in echoed and (req.logprobs is None or out.prompt_logprobs is not None
                                                   or out.finished):
                echoed.add(rid)
                echo = prompts.echo(pi)
                text = echo + text
                if req.logprobs is not None:
                    lp = builders[rid].echo(prompts.ids[pi], out.prompt_logprobs, echo)
            if req.logprobs is not None and out.logprobs:
                lp = merge_legacy(lp, builders[rid].tokens(out.logprobs))
            if out.finished:
                completion_tokens += out.num_generated_tokens
                err = failure(out)
                if err is not None:
                    yield sse(err.body())
                    continue
            if text or lp or out.finished:
                choice = {"index": pi * req.n + j, "text": text, "logprobs": lp,
                          "finish_reason": out.finish_reason if out.finished else None}
                yield sse({**head, "choices": [choice]})
        if req.stream_options and req.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompts.num_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        group.abort()
