"""Helpers for the server tests: the tiny model, an in-process uvicorn server on a free loopback
port, and a way to slow the engine down so that requests are reliably in flight."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

import jisu
from tests.fixtures import write_hf_llama


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    return write_hf_llama(str(tmp_path_factory.mktemp("serve_tiny")))


@pytest.fixture(scope="session")
def tiny_llm(tiny_path):
    return jisu.load(tiny_path)


@contextlib.contextmanager
def running(app, timeout: float = 30.0):
    """Serve `app` with uvicorn in a thread on 127.0.0.1:<free port>; yields (base_url, server)."""
    from jisu.serve.server import make_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def slow_down(app, seconds: float = 0.02) -> None:
    """Make every engine step take at least `seconds` (streams stay open long enough to cut)."""
    engine = app.state.jisu.engine
    real = engine.runner  # shared by the LLM's engines: wrapped for this engine only

    class Slow:
        def run(self, step, kv):
            time.sleep(seconds)
            return real.run(step, kv)

    engine.runner = Slow()


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
