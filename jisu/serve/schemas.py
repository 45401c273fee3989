"""The response bodies, as pydantic models for /openapi.json and /docs only: the endpoints build
their answers as dicts (faster), in exactly these shapes."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .protocol import ToolCall


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="the answer; null when the answer is only tool calls")
    tool_calls: list[ToolCall] | None = Field(default=None, description="present when the model called tools")


FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    """The answer of a non-streamed chat completion; with `stream: true` the body is instead a
    text/event-stream of ChatCompletionChunk events ending with `data: [DONE]`."""
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = Field(default=None, description="{name, arguments}: the whole call")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A completion; with `stream: true`, a text/event-stream of these (usage on the last only)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str = Field(description='"ok"; with 503, "draining" or "engine stopped"')


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    model_max_length: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses, in the OpenAI error shape."""
    what = {400: "invalid request (names the parameter)", 401: "missing or wrong API key",
            404: "unknown model", 413: "body too large", 429: "queue full (Retry-After)",
            500: "engine error", 501: "structured output unavailable (llguidance missing)",
            503: "draining or stopped"}
    return {c: {"model": ErrorResponse, "description": what.get(c, "error")} for c in codes}


def answer(model: type[BaseModel], description: str, stream: type[BaseModel] | None = None) -> dict:
    """OpenAPI `responses` entry for a 200 with `model` (and an event stream of `stream`)."""
    content: dict[str, Any] = {}
    if stream is not None:
        content["text/event-stream"] = {"schema": {"$ref": f"#/components/schemas/{stream.__name__}"},
                                        "description": f"with stream: true, server-sent events `data: "
                                                       f"<{stream.__name__}>`, then `data: [DONE]`"}
    return {200: {"model": model, "description": description, **({"content": content} if content else {})}}
