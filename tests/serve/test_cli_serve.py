"""`jisu serve` argument checks (before any model is loaded) and its wiring to serve()."""
from __future__ import annotations

import pytest

from jisu import cli


@pytest.mark.parametrize("args,needle", [
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--kv-memory", "0"], "--kv-memory"),
    (["--port", "70000"], "--port"),
])
def test_bad_options_fail_fast(capsys, args, needle):
    assert cli.main(["serve", *args]) == 2
    assert needle in capsys.readouterr().err


def test_serve_wiring(monkeypatch, tiny_path):
    seen = {}

    def fake_serve(llm, host, port, **kw):
        seen.update(host=host, port=port, model=llm.source.path, **kw)
        return 0

    monkeypatch.setattr("jisu.serve.serve", fake_serve)
    monkeypatch.setenv("JISU_API_KEY", "from-env")
    assert cli.main(["serve", tiny_path, "--port", "8123", "--max-concurrency", "4", "--kv-memory", "8"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123 and seen["api_key"] == "from-env"
    assert seen["max_concurrency"] == 4 and seen["kv_memory_mb"] == 8 and seen["model"] == tiny_path
