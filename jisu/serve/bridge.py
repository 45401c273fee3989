"""The bridge between the engine thread and the event loop (llama.cpp's server-queue): the engine
requests of one HTTP request post their outputs to an asyncio queue, to be streamed or folded into
finished results; a client that goes away has its engine requests aborted, freeing their KV blocks."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..config import SamplingParams
from ..engine.engine import EngineError, QueueFull
from ..engine.request import RequestOutput, TokenLogprob
from .protocol import APIError
from .state import ServerState


log = logging.getLogger("jisu.serve")


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
        return self.submit_forks(prompt_ids, [params], **kw)[0]

    def submit_forks(self, prompt_ids: list[int], params: list[SamplingParams], **kw) -> list[str]:
        """Candidates on one prompt that prefill it once (engine.add_forks); errors as in submit."""
        try:
            rids = self.state.engine.add_forks(prompt_ids, params, callback=self._callback, **kw)
        except QueueFull as e:
            self.abort()
            raise APIError(429, f"the server is at capacity ({e}); retry later", code="queue_full",
                           headers={"Retry-After": str(self.state.settings.retry_after_s)}) from None
        except EngineError as e:
            self.abort()
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        self.ids += rids
        return rids

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

    async def results(self, request: Request, poll_s: float) -> dict[str, Finished]:
        """Waits for every engine request to finish (non-streaming responses) and folds the outputs
        of each, by request id in submission order. The client is checked every `poll_s`: gone, it
        raises ClientGone. Whatever still runs is aborted on the way out."""
        outs: dict[str, list[RequestOutput]] = {rid: [] for rid in self.ids}
        loop = asyncio.get_running_loop()
        next_check = loop.time() + poll_s
        try:
            while not self.finished:
                try:
                    out = await asyncio.wait_for(self.next(), timeout=max(0.0, next_check - loop.time()))
                    outs[out.request_id].append(out)
                except asyncio.TimeoutError:
                    pass
                if loop.time() >= next_check:      # outputs may arrive faster than poll_s: check by the clock
                    if await request.is_disconnected():
                        raise ClientGone from None
                    next_check = loop.time() + poll_s
        finally:
            self.abort()
        return {rid: fold(o) for rid, o in outs.items()}


def _param_of(message: str) -> str | None:
    if "max_tokens" in message:
        return "max_tokens"
    if "prompt" in message:
        return "prompt"
    return None


class ClientGone(Exception):
    """The client of a non-streaming request went away before its answer (the app answers 499)."""


@dataclass
class Finished:
    """All that one engine request produced, its outputs folded together."""
    text: str = ""                                                  # the generated text
    logprobs: list[TokenLogprob] = field(default_factory=list)     # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None       # one per prompt token, when asked for
    finish_reason: str | None = None                                # "stop" | "length" | "abort"
    num_generated_tokens: int = 0                                   # tokens generated in all
    sequences: list | None = None                                   # beam search: the returned beams, best first


def failure(out: RequestOutput) -> APIError | None:
    """The 500 for an output that ends its request with an engine error (logged here), else None."""
    if out.finished and out.finish_reason == "error":
        log.error("request %s failed: %s", out.request_id, out.error)
        return APIError(500, "the request failed inside the engine (see the server log)", code="internal_error")
    return None


def fold(outputs: list[RequestOutput]) -> Finished:
    """The outputs of one engine request folded into one result; an engine error is raised (500)."""
    r = Finished()
    for o in outputs:
        r.text += o.text
        r.logprobs += o.logprobs or []
        if o.prompt_logprobs is not None:
            r.prompt_logprobs = o.prompt_logprobs
        err = failure(o)
        if err is not None:
            raise err
        if o.finished:
            r.finish_reason, r.num_generated_tokens = o.finish_reason, o.num_generated_tokens
            r.sequences = o.sequences
    return r


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """The response that streams `events` (server-sent events) as they come."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
