"""The pure-ASGI front of the server: header and body size limits (431, 413), draining (503), the
API key (401, compared in constant time), request metrics, and in-flight accounting for the drain."""
from __future__ import annotations

import hmac
import json

from .protocol import APIError
from .state import ServerState


_TOKENIZER_PATHS = {"/tokenize", "/detokenize", "/tokenizer_info"}
_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", *_TOKENIZER_PATHS}


class Guard:
    """Pure-ASGI front: request metrics, draining (503), API key (401), body size (413: from
    Content-Length, and while the body streams in), and in-flight accounting for the drain."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status_seen = {"code": 0}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
            await send(message)

        try:
            head = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
            if head > st.settings.max_header_bytes:
                await _send_error(send_wrapped, APIError(431, f"request headers too large ({head} bytes; the limit is "
                                                              f"{st.settings.max_header_bytes})",
                                                         code="headers_too_large"))
            elif path.startswith("/v1/") or path in _TOKENIZER_PATHS:
                await self._v1(scope, receive, send_wrapped)
            else:
                await self.app(scope, receive, send_wrapped)
        finally:
            st.metrics.requests.labels(endpoint, str(status_seen["code"] or 499)).inc()

    async def _v1(self, scope, receive, send):
        st = self.state
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(headers)
        if refusal is not None:
            return await _send_error(send, refusal)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            receive = await self._read_body(headers, receive, send)
            if receive is None:
                return
        st.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            st.inflight -= 1

    def _refusal(self, headers: dict[str, str]) -> APIError | None:
        """503 while draining, 401 without the API key; None lets the request in."""
        settings = self.state.settings
        if self.state.draining:
            return APIError(503, "the server is shutting down", code="draining",
                            headers={"Retry-After": str(settings.retry_after_s)})
        key = settings.api_key
        if key:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _read_body(self, headers: dict[str, str], receive, send):
        """Reads the whole body within the limit and returns a `receive` that replays it; None when
        the request ends here (answered 400/413, or the client went away)."""
        limit = self.state.settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _send_error(send, APIError(400, "invalid Content-Length header"))
            if int(length) > limit:
                return await _send_error(send, _too_large(int(length), limit))
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                # read (a bounded amount of) the rest first: closing on unread data resets the
                # connection and the client may never see the 413
                extra = len(body)
                body = bytearray()
                while more and extra < 4 * limit:
                    message = await receive()
                    extra += len(message.get("body", b""))
                    more = message.get("more_body", False) and message["type"] != "http.disconnect"
                return await _send_error(send, _too_large(None, limit))
        if body and not _is_text(bytes(body)):  # else FastAPI answers a bare {"detail": ...}
            return await _send_error(send, APIError(400, "the request body is not JSON text (it does not decode as "
                                                         "UTF-8)", code="invalid_json"))
        return _replay(bytes(body), receive)


def _is_text(body: bytes) -> bool:
    """Whether the body decodes the way json.loads will read it (UTF-8, or UTF-16/32 by its BOM)."""
    try:
        body.decode(json.detect_encoding(body))
    except (UnicodeDecodeError, LookupError):
        return False
    return True


def _too_large(size: int | None, limit: int) -> APIError:
    got = f" ({size} bytes)" if size is not None else ""
    return APIError(413, f"request body too large{got}: the limit is {limit} bytes", code="request_too_large")


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def _send_error(send, err: APIError) -> None:
    """Answers `err` in the OpenAI error shape straight over ASGI (413 and 431 close the connection)."""
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if err.status in (413, 431):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
