"""The OpenAI-compatible HTTP API over the engine: /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics.

The engine runs its step loop in one background thread; each HTTP request submits engine requests
whose outputs come back through an asyncio.Queue fed with `loop.call_soon_threadsafe`. A client
that goes away (stream or not) has its engine requests aborted, which frees their KV blocks."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..config import SamplingParams
from ..engine.engine import Engine, EngineError, QueueFull
from ..engine.request import RequestOutput, TokenLogprob
from ..errors import JisuError
from ..io.tokenizer import StreamDecoder
from .guard import Guard
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import (MAX_BODY_BYTES, MAX_HEADER_BYTES, APIError, ChatCompletionRequest, CompletionRequest,
                       DetokenizeRequest, TokenizeRequest, error_body,
                       new_id, now, usage)

log = logging.getLogger("jisu.serve")


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    max_header_bytes: int = MAX_HEADER_BYTES
    retry_after_s: int = 1
    served_model_name: str | None = None
    poll_disconnect_s: float = 0.5      # how often a non-streaming request checks its client


@dataclass
class ServerState:
    llm: Any
    engine: Engine
    settings: ServerSettings
    metrics: Metrics
    model_names: list[str]
    draining: bool = False
    inflight: int = 0                   # /v1 HTTP requests being served
    manage_engine: bool = True
    token_text_cache: dict[int, str] = field(default_factory=dict)

    def token_text(self, token_id: int) -> str:
        s = self.token_text_cache.get(token_id)
        if s is None:
            s = self.llm.tokenizer.decode([token_id], skip_special=False)
            if len(self.token_text_cache) < 200_000:
                self.token_text_cache[token_id] = s
        return s


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ----------------------------------------------------------------------------- engine bridge
class _Mailbox:
    """Carries engine outputs into one event loop with one wakeup per batch: the engine thread posts
    every output of a step, and only the first one since the last delivery calls
    `call_soon_threadsafe` (each call writes to the loop's self-pipe: 16 streams made 16 writes and
    wakeups per step). Outputs are delivered in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # not a strong reference: the registry below is keyed weakly by it
        self._lock = threading.Lock()
        self._items: list = []

    def post(self, fn, arg) -> None:                   # any thread
        with self._lock:
            self._items.append((fn, arg))
            first = len(self._items) == 1
        loop = self._loop()
        if first and loop is not None:
            with contextlib.suppress(RuntimeError):    # loop closed: nobody is listening any more
                loop.call_soon_threadsafe(self._deliver_all)

    def _deliver_all(self) -> None:                    # event loop
        with self._lock:
            items, self._items = self._items, []
        for fn, arg in items:
            fn(arg)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = _Mailbox(loop)
    return box


class Group:
    """The engine requests of one HTTP request and the queue their outputs arrive on."""

    def __init__(self, state: ServerState):
        self.state = state
        self.mailbox = _mailbox(asyncio.get_running_loop())
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.ids: list[str] = []
        self.done: set[str] = set()

    def _callback(self, out: RequestOutput) -> None:   # engine thread
        self.mailbox.post(self._deliver, out)

    def _deliver(self, out: RequestOutput) -> None:    # event loop, even when nobody reads the queue
        if out.finished:
            self.state.metrics.observe_finished(out)
        self.queue.put_nowait(out)

    def submit(self, prompt_ids: list[int], params: SamplingParams, **kw) -> str:
        try:
            rid = self.state.engine.add_request(prompt_ids, params, callback=self._callback, **kw)
        except QueueFull as e:
            self.abort()
            raise APIError(429, f"the server is at capacity ({e}); retry later", code="queue_full",
                           headers={"Retry-After": str(self.state.settings.retry_after_s)}) from None
        except EngineError as e:
            self.abort()
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        self.ids.append(rid)
        return rid

    async def next(self) -> RequestOutput:
        out = await self.queue.get()
        if out.finished:
            self.done.add(out.request_id)
        return out

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.ids)

    def abort(self) -> None:
        for rid in self.ids:
            if rid not in self.done:
                self.state.engine.abort(rid)


def _param_of(message: str) -> str | None:
    if "max_tokens" in message:
        return "max_tokens"
    if "prompt" in message:
        return "prompt"
    return None


class _ClientGone(Exception):
    pass


async def _collect(group: Group, request: Request, poll_s: float) -> dict[str, list[RequestOutput]]:
    """Wait for every engine request of the group to finish (non-streaming responses)."""
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in group.ids}
    loop = asyncio.get_running_loop()
    next_check = loop.time() + poll_s
    while not group.finished:
        try:
            out = await asyncio.wait_for(group.next(), timeout=max(0.0, next_check - loop.time()))
            outs[out.request_id].append(out)
        except asyncio.TimeoutError:
            pass
        if loop.time() >= next_check:      # outputs may arrive faster than poll_s: check by the clock
            if await request.is_disconnected():
                raise _ClientGone from None
            next_check = loop.time() + poll_s
    return outs


# ----------------------------------------------------------------------------- helpers
def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.model_names:
        raise APIError(404, f"the model `{model}` does not exist; this server serves `{state.model_names[0]}`",
                       param="model", code="model_not_found")


def _sampling(state: ServerState, req, max_tokens: int, seed: int | None) -> SamplingParams:
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    vocab = state.engine.vocab_size
    for t in req.stop_token_ids or ():
        if not 0 <= t < vocab:
            raise APIError(400, f"stop_token_ids: {t} is outside the vocabulary [0, {vocab})", param="stop_token_ids")
    temperature = 1.0 if req.temperature is None else req.temperature
    try:
        return SamplingParams(max_tokens=max(1, max_tokens), temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k),
                              min_p=req.min_p, seed=seed, stop=req.stop_list,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos,
                              stop_token_ids=tuple(req.stop_token_ids or ()))
    except JisuError as e:
        msg = str(e).removeprefix("sampling: ")
        raise APIError(400, msg, param=msg.split("=", 1)[0]) from None


def _choice_seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i


def _check_max_tokens(state: ServerState, num_prompt: int, max_tokens: int, *, allow_zero: bool, param: str) -> None:
    ctx = state.engine.max_context
    if max_tokens < (0 if allow_zero else 1):
        raise APIError(400, f"{param} must be at least {0 if allow_zero else 1} (got {max_tokens})", param=param)
    if num_prompt + max_tokens > ctx:
        raise APIError(400, f"this model's maximum context length is {ctx} tokens, but {num_prompt + max_tokens} "
                            f"were requested ({num_prompt} in the prompt + {max_tokens} for {param})", param=param)


def _check_ids(state: ServerState, ids: list[int]) -> None:
    vocab = state.engine.vocab_size
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- logprob shapes
class LegacyLogprobs:
    """Builds the completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, state: ServerState, start_offset: int):
        self.state = state
        self.offset = start_offset
        self.decoder = StreamDecoder(state.llm.tokenizer)

    def prompt(self, ids: list[int], lps: list[TokenLogprob | None]) -> dict:
        return self._build(ids, lps)

    def tokens(self, lps: list[TokenLogprob]) -> dict:
        return self._build([lp.token_id for lp in lps], lps)

    def _build(self, ids: list[int], lps: list) -> dict:
        tt = self.state.token_text
        res = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(ids, lps):
            res["tokens"].append(tt(tid))
            res["text_offset"].append(self.offset)
            self.offset += len(self.decoder.push(tid))
            if lp is None:
                res["token_logprobs"].append(None)
                res["top_logprobs"].append(None)
            else:
                res["token_logprobs"].append(_finite(lp.logprob))
                res["top_logprobs"].append({tt(i): _finite(v) for i, v in lp.top})
        return res


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def _merge_legacy(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def _chat_logprobs(state: ServerState, lps: list[TokenLogprob]) -> dict:
    tt = state.token_text
    content = []
    for lp in lps:
        s = tt(lp.token_id)
        content.append({"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": tt(i), "logprob": _finite(v), "bytes": list(tt(i).encode("utf-8"))}
                                         for i, v in lp.top]})
    return {"content": content}


# ----------------------------------------------------------------------------- the app
def create_app(llm, engine: Engine | None = None, *, api_key: str | None = None, max_concurrency: int = 64,
               max_queue: int = 256, kv_memory_mb: float | None = None, served_model_name: str | None = None,
               settings: ServerSettings | None = None, **engine_kw) -> FastAPI:
    """An app serving `llm`. Without `engine`, builds one (max_concurrency running sequences,
    max_queue more waiting, kv_memory_mb of KV cache) and runs it for the app's lifetime."""
    settings = settings or ServerSettings(api_key=api_key, served_model_name=served_model_name)
    manage = engine is None
    if engine is None:
        engine = Engine.from_llm(llm, max_num_seqs=max_concurrency, max_queue=max_concurrency + max_queue,
                                 kv_memory_mb=kv_memory_mb, **engine_kw)
    names = _model_names(llm.source, settings.served_model_name)
    state = ServerState(llm, engine, settings, Metrics(engine), names, manage_engine=manage)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            if state.manage_engine:
                await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="jisu", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jisu = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(_validation_to_api(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return _error_response(APIError(500, "internal server error", code="internal_error"))

    @app.get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": names[0], "object": "model", "created": now(), "owned_by": "jisu",
                                            "max_model_len": engine.max_context}]}

    # vLLM-compatible tokenizer endpoints: lm-eval-harness's local-completions detects them and
    # counts context tokens with the server's own tokenizer (no tokenizer download needed)
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = llm.tokenizer
        return {"tokenizer_class": "jisu", "model_max_length": engine.max_context,
                "bos_token": tok.token_text(tok.bos_id) if tok.bos_id is not None else None,
                "eos_token": tok.token_text(tok.eos_ids[0]) if tok.eos_ids else None, "pad_token": None,
                "add_bos_token": tok.add_bos, "chat_template": tok.chat_template}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        _check_model(state, body.model)
        tok = llm.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        try:
            if body.messages is not None:
                msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
                ids = tok.encode(tok.render_chat(msgs, add_generation_prompt=body.add_generation_prompt),
                                 add_bos=False)
            else:
                ids = tok.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
        except JisuError as e:
            raise APIError(400, str(e), param="messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        _check_model(state, body.model)
        if body.tokens:
            _check_ids(state, body.tokens)
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _completions(state, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _chat(state, body, request)

    app.add_middleware(Guard, state=state)
    return app


def _model_names(source, served: str | None) -> list[str]:
    """The id /v1/models reports (the file or folder name, unless given) and the other names a
    request may use: the source's display name, its path, and a known model's short names."""
    base = os.path.basename(os.path.abspath(source.path))
    stem = base[:-5] if base.lower().endswith(".gguf") else base
    names = [served or stem, stem, base, source.name, source.path]
    try:
        from ..io.sources import ALIASES, KNOWN_MODELS, known_model_path

        for short, known in KNOWN_MODELS.items():
            if known_model_path(known) == source.path:
                names += [short, *(a for a, t in ALIASES.items() if t == short)]
    except Exception:  # noqa: BLE001 - names are a convenience
        pass
    return list(dict.fromkeys(names))


def _validation_to_api(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    if not errs:
        return APIError(400, "invalid request")
    # a union reports one error per branch: prefer a constraint ("too long", "greater than") over a type mismatch
    e = next((x for x in errs if not str(x.get("type", "")).endswith("_type")), errs[0])
    if e.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", code="invalid_json")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # drop pydantic's union-branch labels ("str", "list[int]", ...) from the location
    parts = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool",
                                                                              "function-after", "constrained-str")]
    param = parts[0] if parts else None
    where = ".".join(parts) or "body"
    if e.get("type") == "missing":
        return APIError(400, f"missing required parameter: {where}", param=param, code="missing_required_parameter")
    given = e.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{where}: {msg}{shown}", param=param)


# ----------------------------------------------------------------------------- /v1/completions
async def _completions(state: ServerState, req: CompletionRequest, request: Request):
    _check_model(state, req.model)
    tok = state.llm.tokenizer
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    # prompts -> token ids (+ the text echoed back)
    p = req.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    ids_list, texts = [], []
    for pr in prompts:
        if isinstance(pr, str):
            if not pr:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = tok.encode(pr)
            texts.append(pr)
        else:
            ids = list(pr)
            _check_ids(state, ids)
            texts.append(None)
        _check_ids(state, ids)
        ids_list.append(ids)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for ids in ids_list:
        _check_max_tokens(state, len(ids), max_tokens, allow_zero=req.echo, param="max_tokens")
    n = req.n
    best_of = req.best_of or n
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be >= n ({n})", param="best_of")
    if req.stream and best_of > n:
        raise APIError(400, "best_of > n cannot be streamed", param="best_of")
    if len(ids_list) * best_of > state.engine.max_queue:
        raise APIError(400, f"{len(ids_list)} prompts x best_of {best_of} exceeds the server's queue", param="n")
    want_lp = req.logprobs
    engine_lp = want_lp if want_lp is not None else (0 if best_of > n else None)
    scoring = max_tokens == 0

    group = Group(state)
    subs = []   # (prompt index, choice index within prompt, rid)
    for pi, ids in enumerate(ids_list):
        for j in range(best_of):
            params = _sampling(state, req, max_tokens, _choice_seed(req.seed, j))
            rid = group.submit(ids, params, max_new_tokens=max_tokens, logprobs=None if scoring else engine_lp,
                               prompt_logprobs=(want_lp if want_lp is not None else 0) if req.echo and (
                                   want_lp is not None or scoring) else None)
            subs.append((pi, j, rid))
    cid, created, model = new_id("cmpl"), now(), state.model_names[0]
    prompt_tokens = sum(len(ids) for ids in ids_list)

    def echo_text(pi: int) -> str:
        t = texts[pi]
        return t if t is not None else tok.decode(ids_list[pi])

    if req.stream:
        return StreamingResponse(_stream_completions(state, req, request, group, subs, ids_list, echo_text, cid,
                                                     created, model, prompt_tokens),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        outs = await _collect(group, request, state.settings.poll_disconnect_s)
    except _ClientGone:
        return Response(status_code=499)
    finally:
        group.abort()
    results = {}
    for pi, j, rid in subs:
        text, token_lps, prompt_lps, reason, ntok = "", [], None, None, 0
        for o in outs[rid]:
            text += o.text
            token_lps += o.logprobs or []
            if o.prompt_logprobs is not None:
                prompt_lps = o.prompt_logprobs
            if o.finished:
                reason, ntok = o.finish_reason, o.num_generated_tokens
                if reason == "error":
                    log.error("request %s failed: %s", rid, o.error)
                    raise APIError(500, "the request failed inside the engine (see the server log)",
                                   code="internal_error")
        results[rid] = (text, token_lps, prompt_lps, reason, ntok)
    choices, completion_tokens = [], 0
    for pi in range(len(ids_list)):
        cands = [(j, rid) for p_, j, rid in subs if p_ == pi]
        completion_tokens += sum(results[rid][4] for _, rid in cands)
        if best_of > n:   # keep the n candidates with the highest total log-probability
            cands.sort(key=lambda c: -sum(lp.logprob for lp in results[c[1]][1]))
            cands = sorted(cands[:n])
        for k, (j, rid) in enumerate(cands):
            text, token_lps, prompt_lps, reason, _ = results[rid]
            full = (echo_text(pi) + text) if req.echo else text
            lp_obj = None
            if want_lp is not None:
                builder = LegacyLogprobs(state, 0)
                if req.echo:
                    lp_obj = builder.prompt(ids_list[pi], prompt_lps or [None] * len(ids_list[pi]))
                    builder.offset = len(echo_text(pi))
                lp_obj = _merge_legacy(lp_obj, builder.tokens(token_lps))
            choices.append({"index": pi * n + k, "text": full, "logprobs": lp_obj, "finish_reason": reason})
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


async def _stream_completions(state, req, request, group: Group, subs, ids_list, echo_text, cid, created, model,
                              prompt_tokens) -> AsyncIterator[str]:
    index = {rid: pi * req.n + j for pi, j, rid in subs}
    prompt_of = {rid: pi for pi, j, rid in subs}
    builders = {rid: LegacyLogprobs(state, 0) for rid in index}
    echoed: set[str] = set()
    completion_tokens = 0
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        while not group.finished:
            out = await group.next()
            rid = out.request_id
            text, lp_obj = out.text, None
            if req.echo and rid not in echoed:
                if req.logprobs is not None and out.prompt_logprobs is None and not out.finished:
                    pass  # prompt log-probs arrive with the first token
                else:
                    echoed.add(rid)
                    pi = prompt_of[rid]
                    text = echo_text(pi) + text
                    if req.logprobs is not None:
                        ids = ids_list[pi]
                        lp_obj = builders[rid].prompt(ids, out.prompt_logprobs or [None] * len(ids))
                        builders[rid].offset = len(echo_text(pi))
            if req.logprobs is not None and out.logprobs:
                lp_obj = _merge_legacy(lp_obj, builders[rid].tokens(out.logprobs))
            if out.finished:
                completion_tokens += out.num_generated_tokens
                if out.finish_reason == "error":
                    log.error("request %s failed: %s", rid, out.error)
                    yield _sse(error_body("the request failed inside the engine (see the server log)",
                                          "server_error", None, "internal_error"))
                    continue
            if text or lp_obj or out.finished:
                choice = {"index": index[rid], "text": text, "logprobs": lp_obj,
                          "finish_reason": out.finish_reason if out.finished else None}
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                            "choices": [choice]})
        if include_usage:
            yield _sse({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        group.abort()


# ----------------------------------------------------------------------------- /v1/chat/completions
async def _chat(state: ServerState, req: ChatCompletionRequest, request: Request):
    _check_model(state, req.model)
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
    _check_ids(state, ids)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = state.engine.max_context - len(ids)
        if max_tokens < 1:
            raise APIError(400, f"the messages take {len(ids)} tokens, the whole context of "
                                f"{state.engine.max_context}", param="messages")
    _check_max_tokens(state, len(ids), max_tokens, allow_zero=False, param=param)
    lp = (req.top_logprobs or 0) if req.logprobs else None
    group = Group(state)
    for j in range(req.n):
        group.submit(ids, _sampling(state, req, max_tokens, _choice_seed(req.seed, j)), logprobs=lp)
    cid, created, model = new_id("chatcmpl"), now(), state.model_names[0]
    if req.stream:
        return StreamingResponse(_stream_chat(state, req, group, ids, cid, created, model),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        outs = await _collect(group, request, state.settings.poll_disconnect_s)
    except _ClientGone:
        return Response(status_code=499)
    finally:
        group.abort()
    choices, completion_tokens = [], 0
    for j, rid in enumerate(group.ids):
        text, lps, reason = "", [], None
        for o in outs[rid]:
            text += o.text
            lps += o.logprobs or []
            if o.finished:
                reason = o.finish_reason
                completion_tokens += o.num_generated_tokens
                if reason == "error":
                    log.error("request %s failed: %s", rid, o.error)
                    raise APIError(500, "the request failed inside the engine (see the server log)",
                                   code="internal_error")
        choices.append({"index": j, "message": {"role": "assistant", "content": text},
                        "logprobs": _chat_logprobs(state, lps) if req.logprobs else None, "finish_reason": reason})
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(len(ids), completion_tokens)}


async def _stream_chat(state, req: ChatCompletionRequest, group: Group, ids, cid, created, model) -> AsyncIterator[str]:
    index = {rid: j for j, rid in enumerate(group.ids)}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    completion_tokens = 0

    def chunk(j: int, delta: dict, reason=None, logprobs=None) -> str:
        c = {"index": j, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [c]})

    try:
        for j in range(len(group.ids)):
            yield chunk(j, {"role": "assistant", "content": ""})
        while not group.finished:
            out = await group.next()
            j = index[out.request_id]
            if out.finished and out.finish_reason == "error":
                log.error("request %s failed: %s", out.request_id, out.error)
                yield _sse(error_body("the request failed inside the engine (see the server log)", "server_error",
                                      None, "internal_error"))
                continue
            lp = _chat_logprobs(state, out.logprobs) if req.logprobs and out.logprobs else None
            if out.text or lp:
                yield chunk(j, {"content": out.text}, None, lp)
            if out.finished:
                completion_tokens += out.num_generated_tokens
                yield chunk(j, {}, out.finish_reason)
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": usage(len(ids), completion_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        group.abort()
