"""OpenAI-compatible request bodies (pydantic) with their limits, the OpenAI error shape, and the
small pieces of a response (ids, usage, server-sent events).

Ranges follow the OpenAI API where it has one; everything else is bounded so that no request can
ask for unbounded work or memory. Violations become 400 errors naming the parameter."""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

# --- limits ---------------------------------------------------------------------------------------
MAX_N = 8                   # choices per prompt (n, best_of)
MAX_LOGPROBS = 20           # completions `logprobs`, chat `top_logprobs`
MAX_STOP = 16               # stop strings
MAX_STOP_LEN = 256          # characters per stop string
MAX_PROMPTS = 64            # prompts in one completions request
MAX_MESSAGES = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_BODY_BYTES = 1 << 20    # request body (checked by the server before parsing)
MAX_HEADER_BYTES = 32 << 10

Float = Annotated[float, Field(allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64, strict=True)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
            503: "service_unavailable"}.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    def text(s):  # what a request echoes back may hold lone surrogates, which UTF-8 cannot carry
        return s.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(s, str) else s
    return {"error": {"message": text(message), "type": type, "param": text(param), "code": code}}


def validation_error(errors: list[dict]) -> APIError:
    """The 400 for a body that fails its schema (pydantic's `errors()`), naming the parameter."""
    if not errors:
        return APIError(400, "invalid request")
    # a union reports one error per branch: prefer a constraint ("too long", "greater than") over a type mismatch
    e = next((x for x in errors if not str(x.get("type", "")).endswith("_type")), errors[0])
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


class _Base(BaseModel):
    # unknown fields are ignored (clients send vendor extras), known ones are checked strictly
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Base):
    include_usage: StrictBool = False


class _Sampling(_Base):
    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None = None
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Float] | None = None
    user: StrictStr | None = None
    # extensions (as in vLLM / llama.cpp)
    top_k: Annotated[int, Field(ge=-1, le=1 << 20, strict=True)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] = 1.0
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    speculative: Literal["auto", "ngram", "draft", "off"] | None = None   # None: the server's default
    # beam search (vLLM's extras): best_of (or n) beams, the best n returned
    use_beam_search: StrictBool = False
    length_penalty: Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)] = 1.0
    early_stopping: StrictBool | Literal["never"] = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if isinstance(v, list) and not v:
            raise ValueError("stop must not be an empty list")
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_LEN:
                raise ValueError(f"stop strings are limited to {MAX_STOP_LEN} characters")
        return v

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# --- structured output and tools (OpenAI's shapes) ---------------------------------------------------
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$", strict=True)]
MAX_TOOLS = 128


class ResponseFormatText(_Base):
    type: Literal["text"]


class ResponseFormatJSONObject(_Base):
    """JSON mode: the output is one JSON object."""
    type: Literal["json_object"]


class JSONSchemaFormat(_Base):
    name: FunctionName = Field(description="a name for the schema (a-z, A-Z, 0-9, _ and -, up to 64)")
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema",
                                    description="the JSON Schema the output must validate against")
    strict: StrictBool | None = None


class ResponseFormatJSONSchema(_Base):
    """Structured output: the output is a JSON document valid under `json_schema.schema`."""
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[ResponseFormatText, ResponseFormatJSONObject, ResponseFormatJSONSchema],
                           Field(discriminator="type")]


class FunctionDefinition(_Base):
    name: FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="JSON Schema of the arguments object")
    strict: StrictBool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(_Base):
    name: FunctionName


class NamedToolChoice(_Base):
    """Force a call of this function."""
    type: Literal["function"]
    function: FunctionRef


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(_Base):
    name: StrictStr
    arguments: StrictStr = Field(description="the arguments as a JSON text")


class ToolCall(_Base):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    max_tokens: StrictInt | None = 16
    echo: StrictBool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] | None = None
    suffix: StrictStr | None = None
    response_format: ResponseFormat | None = None


class TextPart(_Base):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None   # an assistant's calls
    tool_call_id: StrictStr | None = None                                             # a tool's answer

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS, strict=True)] | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N, strict=True)] | None = None   # beam search's width
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = Field(default=None, description='"none", "auto" (the default with tools), '
                                           '"required", or {"type": "function", "function": {"name": ...}}')
    parallel_tool_calls: StrictBool = Field(default=False, description="allow several calls in one answer (up "
                                            "to 4); off by default, as in llama.cpp's server")
    response_format: ResponseFormat | None = None


class TokenizeRequest(_Base):
    """vLLM's /tokenize (lm-eval-harness uses it as its `remote` tokenizer)."""
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Base):
    model: StrictStr | None = None
    tokens: Annotated[list[StrictInt], Field(max_length=1 << 20)]


# --- responses ------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
