"""The OpenAI-compatible HTTP API over the engine: the server's settings and state, and the app with
its small routes (/v1/models, /health, /metrics, the tokenizer routes). The generating endpoints live
in completions.py and chat.py, the ASGI front in guard.py, the engine bridge in bridge.py."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from ..engine.engine import Engine
from ..errors import JisuError
from ..version import __version__
from .bridge import ClientGone
from .chat import chat_completions
from .completions import completions
from .guard import Guard
from . import schemas as S
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .params import check_model, check_prompt_ids
from .state import ServerSettings, ServerState
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                       DetokenizeRequest, TokenizeRequest, now, validation_error)

log = logging.getLogger("jisu.serve")

_DESCRIPTION = ("OpenAI-compatible API of jisu serve: completions and chat completions (streamed or not, with "
                "structured output through `response_format` and tool calls through `tools`), the served model, "
                "health, Prometheus metrics and the tokenizer. Errors come as {\"error\": {message, type, param, code}}.")


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
    app = FastAPI(title="jisu", version=__version__, description=_DESCRIPTION, lifespan=_lifespan(state), docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.jisu = state
    _add_error_handlers(app)
    _add_status_routes(app, state)
    _add_tokenizer_routes(app, state)

    @app.post("/v1/completions", response_model=None, summary="Complete text (OpenAI completions)",
              responses={**S.answer(S.Completion, "the completion", S.Completion), **S.errors(400, 401, 404, 413,
                                                                                              429, 500, 501)})
    async def completions_route(body: CompletionRequest, request: Request):
        return await completions(state, body, request)

    @app.post("/v1/chat/completions", response_model=None, summary="Answer a conversation (OpenAI chat completions)",
              responses={**S.answer(S.ChatCompletion, "the answer: content, or tool_calls with finish_reason "
                                    "tool_calls", S.ChatCompletionChunk),
                         **S.errors(400, 401, 404, 413, 429, 500, 501)})
    async def chat_completions_route(body: ChatCompletionRequest, request: Request):
        return await chat_completions(state, body, request)

    app.add_middleware(Guard, state=state)
    app.openapi = _openapi(app)
    return app


def _openapi(app: FastAPI):
    """FastAPI's OpenAPI document as this server answers: invalid bodies are 400s (listed per
    route), not FastAPI's 422; the streamed chunk bodies are described as schemas too."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = spec.setdefault("components", {}).setdefault("schemas", {})
            for op in (o for item in spec["paths"].values() for o in item.values()):
                op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                comps.pop(name, None)
            for model in (S.ChatCompletionChunk,):
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(schema.pop("$defs", {}))
                comps[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema
    return build


def _lifespan(state: ServerState):
    """Starts the engine with the app; shuts it down after, where the app built it."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        try:
            yield
        finally:
            if state.manage_engine:
                await asyncio.get_running_loop().run_in_executor(None, state.engine.shutdown)
    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error reaches the client in the OpenAI shape."""
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return _error_response(validation_error(exc.errors()))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)    # nobody reads it; the metrics count it

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return _error_response(APIError(500, "internal server error", code="internal_error"))


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_status_routes(app: FastAPI, state: ServerState) -> None:
    """/health, /metrics and /v1/models."""
    @app.get("/health", response_model=None, responses={**S.answer(S.Health, "serving"), **S.errors(503)})
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.engine.running:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text exposition", "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=None, responses={**S.answer(S.ModelList, "the served model"),
                                                           **S.errors(401)})
    async def models():
        return {"object": "list", "data": [{"id": state.model_names[0], "object": "model", "created": now(),
                                            "owned_by": "jisu", "max_model_len": state.engine.max_context}]}


def _add_tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    """vLLM-compatible tokenizer endpoints: lm-eval-harness's local-completions detects them and
    counts context tokens with the server's own tokenizer (no tokenizer download needed)."""
    @app.get("/tokenizer_info", response_model=None, responses=S.answer(S.TokenizerInfo, "the tokenizer"))
    async def tokenizer_info():
        tok = state.llm.tokenizer
        return {"tokenizer_class": "jisu", "model_max_length": state.engine.max_context,
                "bos_token": tok.token_text(tok.bos_id) if tok.bos_id is not None else None,
                "eos_token": tok.token_text(tok.eos_ids[0]) if tok.eos_ids else None, "pad_token": None,
                "add_bos_token": tok.add_bos, "chat_template": tok.chat_template}

    @app.post("/tokenize", response_model=None, responses={**S.answer(S.TokenizeResponse, "the token ids"),
                                                          **S.errors(400, 404)})
    async def tokenize(body: TokenizeRequest):
        check_model(state, body.model)
        tok = state.llm.tokenizer
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
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_context}

    @app.post("/detokenize", response_model=None, responses={**S.answer(S.DetokenizeResponse, "the text"),
                                                            **S.errors(400, 404)})
    async def detokenize(body: DetokenizeRequest):
        check_model(state, body.model)
        if body.tokens:
            check_prompt_ids(state, body.tokens)
        return {"prompt": state.llm.tokenizer.decode(body.tokens)}


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
