"""Every fuzz harness by name, each set up once per process in a scratch folder."""
from __future__ import annotations

import tempfile

from .core import Harness
from .harness_artifact import HARNESSES as _ARTIFACT
from .harness_http import HARNESSES as _HTTP
from .harness_models import HARNESSES as _MODELS
from .harness_schema import HARNESSES as _SCHEMA
from .harness_text import HARNESSES as _TEXT

HARNESSES: dict[str, Harness] = {h.name: h for h in [*_MODELS, *_ARTIFACT, *_TEXT, *_SCHEMA, *_HTTP]}
_contexts: dict[str, object] = {}
_workdir: list[str] = []


def context(name: str):
    if name not in _contexts:
        if not _workdir:
            _workdir.append(tempfile.mkdtemp(prefix="jisu-fuzz-"))
        import os

        d = os.path.join(_workdir[0], name)
        os.makedirs(d, exist_ok=True)
        _contexts[name] = HARNESSES[name].setup(d)
    return _contexts[name]
