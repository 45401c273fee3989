"""What the endpoints check in a request (model, prompt token ids, lengths) and the engine
parameters they derive from it (llama.cpp's server-task)."""
from __future__ import annotations


from ..config import SamplingParams
from ..errors import JisuError
from .protocol import APIError
from .state import ServerState


def check_model(state: ServerState, model: str | None) -> None:
    """404 unless `model` is None or one of the names this server answers to."""
    if model is not None and model not in state.model_names:
        raise APIError(404, f"the model `{model}` does not exist; this server serves `{state.model_names[0]}`",
                       param="model", code="model_not_found")


def beam_width(req) -> int:
    """The beams of a `use_beam_search` request (best_of, else n; its n best are returned), 1 without;
    400 for what beam search cannot do."""
    if not req.use_beam_search:
        return 1
    width = req.best_of or req.n
    if req.n > width:
        raise APIError(400, f"best_of ({width}) must be >= n ({req.n}) with beam search", param="best_of")
    if req.stream:
        raise APIError(400, "beam search cannot be streamed (its best sequence is known only at the end)",
                       param="stream")
    if req.temperature:
        raise APIError(400, f"beam search is deterministic: temperature must be 0 (got {req.temperature})",
                       param="temperature")
    return width


def sampling_params(state: ServerState, req, max_tokens: int, choice: int, num_beams: int = 1) -> SamplingParams:
    """The sampling parameters of choice number `choice` of `req` (a seeded request gives choice i
    the seed + i, so that its choices differ); with `num_beams` > 1 a beam search returning req.n."""
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    vocab = state.engine.vocab_size
    for t in req.stop_token_ids or ():
        if not 0 <= t < vocab:
            raise APIError(400, f"stop_token_ids: {t} is outside the vocabulary [0, {vocab})", param="stop_token_ids")
    temperature = (1.0 if num_beams == 1 else 0.0) if req.temperature is None else req.temperature
    beams = {} if num_beams == 1 else dict(num_beams=num_beams, num_return_sequences=req.n,
                                           length_penalty=req.length_penalty, early_stopping=req.early_stopping)
    seed = None if req.seed is None else req.seed + choice
    try:
        return SamplingParams(max_tokens=max(1, max_tokens), temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k),
                              min_p=req.min_p, seed=seed, stop=req.stop_list,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos,
                              stop_token_ids=tuple(req.stop_token_ids or ()),
                              speculative=getattr(req, "speculative", None), **beams)
    except JisuError as e:
        msg = str(e).removeprefix("sampling: ")
        raise APIError(400, msg, param=msg.split("=", 1)[0]) from None


def check_max_tokens(state: ServerState, num_prompt: int, max_tokens: int, *, allow_zero: bool, param: str) -> None:
    """400 unless `max_tokens` (named `param` in the request) is positive (or 0 where `allow_zero`)
    and the prompt and its completion fit the context."""
    ctx = state.engine.max_context
    if max_tokens < (0 if allow_zero else 1):
        raise APIError(400, f"{param} must be at least {0 if allow_zero else 1} (got {max_tokens})", param=param)
    if num_prompt + max_tokens > ctx:
        raise APIError(400, f"this model's maximum context length is {ctx} tokens, but {num_prompt + max_tokens} "
                            f"were requested ({num_prompt} in the prompt + {max_tokens} for {param})", param=param)


def check_prompt_ids(state: ServerState, ids: list[int]) -> None:
    """400 for an empty prompt or a token id outside the vocabulary."""
    vocab = state.engine.vocab_size
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
