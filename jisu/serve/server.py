"""Running the app under uvicorn: loopback by default, bounded headers (431), and a graceful
drain on SIGTERM/SIGINT: new API requests get 503 while the ones in flight finish, then the
process exits 0 (a second signal, or the drain timeout, cuts the wait short)."""
from __future__ import annotations

import logging
import socket
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import MAX_HEADER_BYTES

log = logging.getLogger("jisu.serve")


class H11WithLimits(H11Protocol):
    """uvicorn's h11 protocol, answering 431 (not 400) when the request head exceeds the limit."""

    def send_400_response(self, msg: str) -> None:
        conn = self.conn
        limit = getattr(conn, "_max_incomplete_event_size", None)
        buffered = len(getattr(conn, "_receive_buffer", b""))
        if limit is None or buffered <= limit:
            return super().send_400_response(msg)
        import h11

        body = (b'{"error": {"message": "request headers too large", "type": "invalid_request_error", '
                b'"param": null, "code": "headers_too_large"}}')
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        try:
            self.transport.write(conn.send(h11.Response(status_code=431, headers=headers,
                                                        reason=b"Request Header Fields Too Large")))
            self.transport.write(conn.send(h11.Data(data=body)))
            self.transport.write(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # the connection state does not allow a response any more
            pass
        self.transport.close()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout_s: float = 60.0):
        super().__init__(config)
        self.jisu_state = state
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        # not recorded in _captured_signals: uvicorn would re-raise it after shutdown (exit != 0)
        if self.drain_deadline is None:
            log.info("signal %s: draining (new requests get 503), %d in flight", sig, self.jisu_state.inflight)
            self.jisu_state.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout_s
        else:
            self.should_exit = True
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.jisu_state.inflight == 0 or time.monotonic() > self.drain_deadline:
                self.should_exit = True
        return await super().on_tick(counter)


def make_server(app, host: str = "127.0.0.1", port: int = 8000, *, drain_timeout_s: float = 60.0,
                log_level: str = "info", sock: socket.socket | None = None) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, http=H11WithLimits, loop="asyncio", lifespan="on",
                            log_level=log_level, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            timeout_graceful_shutdown=5, timeout_keep_alive=5, access_log=False)
    return DrainingServer(config, app.state.jisu, drain_timeout_s)


def serve(llm, host: str = "127.0.0.1", port: int = 8000, **kw) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a clean drain."""
    from .app import create_app

    drain = kw.pop("drain_timeout_s", 60.0)
    app = create_app(llm, **kw)
    server = make_server(app, host, port, drain_timeout_s=drain)
    server.run()
    return 0
