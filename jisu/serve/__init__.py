"""`jisu serve`: an OpenAI-compatible HTTP server over the continuous-batching engine."""
from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(*args, **kwargs) -> int:
    from .server import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["create_app", "serve"]
