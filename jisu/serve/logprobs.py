"""Log-probabilities in the two OpenAI shapes: the legacy completions object (parallel lists of
tokens, token_logprobs, top_logprobs and text_offset) and chat's list of `content` entries."""
from __future__ import annotations

import math

from ..engine.request import TokenLogprob
from ..io.tokenizer import StreamDecoder
from .state import ServerState


class LegacyLogprobs:
    """Builds the completions `logprobs` object of one choice, piece by piece as its tokens come."""

    def __init__(self, state: ServerState):
        self.token_text = state.token_text
        self.offset = 0                                  # text_offset of the next token
        self.decoder = StreamDecoder(state.llm.tokenizer)

    def echo(self, ids: list[int], lps: list[TokenLogprob | None] | None, text: str) -> dict:
        """The entries of the echoed prompt `ids` (`lps` None: none were computed); the offsets of
        the generated tokens then count from the end of the prompt's `text`."""
        res = self._build(ids, lps or [None] * len(ids))
        self.offset = len(text)
        return res

    def tokens(self, lps: list[TokenLogprob]) -> dict:
        """The entries of generated tokens."""
        return self._build([lp.token_id for lp in lps], lps)

    def _build(self, ids: list[int], lps: list) -> dict:
        tt = self.token_text
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


def merge_legacy(a: dict | None, b: dict) -> dict:
    """Two legacy objects one after the other (`a` None: just `b`)."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(state: ServerState, lps: list[TokenLogprob]) -> dict:
    """The chat `logprobs` object of generated tokens."""
    tt = state.token_text
    content = []
    for lp in lps:
        s = tt(lp.token_id)
        content.append({"token": s, "logprob": _finite(lp.logprob), "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": tt(i), "logprob": _finite(v), "bytes": list(tt(i).encode("utf-8"))}
                                         for i, v in lp.top]})
    return {"content": content}


def _finite(x: float) -> float:
    # JSON has no infinities: a token the model rules out gets a very low but finite log-probability
    return x if math.isfinite(x) else -9999.0
