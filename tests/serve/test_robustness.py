"""The server against bad input and bad circumstances, over real HTTP on 127.0.0.1 (tiny model):
OpenAI-shaped 400s naming the parameter, 401/413/431/429/503, client disconnects freeing KV
blocks, one failing request in a batch, seeds alone vs batched, stream == non-stream, echo scoring,
and a SIGTERM drain in a subprocess."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from jisu.engine.engine import Sampler
from jisu.serve.app import create_app
from tests.serve.conftest import running, slow_down, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def server(tiny_llm):
    app = create_app(tiny_llm, kv_memory_mb=1, max_concurrency=8)
    with running(app) as (url, srv):
        yield url, app


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def check_error(r, status, param=None, *needles):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    for n in needles:
        assert n in err["message"], err
    return err


# ----------------------------------------------------------------------------- 400s
@pytest.mark.parametrize("body,param,needles", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", ["0"]),
    ({"prompt": "hi", "max_tokens": -5}, "max_tokens", ["-5"]),
    ({"prompt": "hi", "max_tokens": 300}, "max_tokens", ["256", "300"]),
    ({"prompt": [5] * 200, "max_tokens": 100}, "max_tokens", ["256", "200", "100"]),
    ({"prompt": "hi", "n": 9}, "n", []),
    ({"prompt": "hi", "n": 0}, "n", []),
    ({"prompt": "hi", "best_of": 99}, "best_of", []),
    ({"prompt": "hi", "n": 3, "best_of": 2}, "best_of", []),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", []),
    ({"prompt": "hi", "logprobs": -1}, "logprobs", []),
    ({"prompt": "hi", "temperature": -0.1}, "temperature", []),
    ({"prompt": "hi", "temperature": 2.5}, "temperature", []),
    ({"prompt": "hi", "temperature": "hot"}, "temperature", []),
    ({"prompt": "hi", "top_p": 0}, "top_p", []),
    ({"prompt": "hi", "top_p": 1.5}, "top_p", []),
    ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty", []),
    ({"prompt": "hi", "frequency_penalty": -2.5}, "frequency_penalty", []),
    ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", []),
    ({"prompt": ""}, "prompt", ["empty"]),
    ({"prompt": []}, "prompt", []),
    ({"prompt": [1, 2, 300]}, "prompt", ["300", "vocabulary"]),
    ({"prompt": [[1, 2], [-1]]}, "prompt", ["-1"]),
    ({"prompt": "hi", "stop": []}, "stop", []),
    ({"prompt": "hi", "stop": [""]}, "stop", ["empty"]),
    ({"prompt": "hi", "stop": ["x"] * 17}, "stop", ["16"]),
    ({"prompt": "hi", "stop": "x" * 300}, "stop", ["256"]),
    ({"prompt": "hi", "stop_token_ids": [1000]}, "stop_token_ids", ["1000"]),
    ({"prompt": "hi", "seed": 1.5}, "seed", []),
    ({"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias", []),
    ({"max_tokens": 5}, "prompt", ["missing"]),
])
def test_completion_params_are_checked(server, body, param, needles):
    url, _ = server
    check_error(post(url, "/v1/completions", body), 400, param, *needles)


@pytest.mark.parametrize("raw", ['{"prompt": "hi", "temperature": NaN}', '{"prompt": "hi", "top_p": Infinity}',
                                 '{"prompt": "hi", "presence_penalty": -Infinity}'])
def test_non_finite_numbers_are_rejected(server, raw):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    err = check_error(r, 400)
    assert err["param"] in ("temperature", "top_p", "presence_penalty")


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_chat_params_are_checked(server, body, param):
    url, _ = server
    check_error(post(url, "/v1/chat/completions", body), 400, param)


def test_malformed_json_and_wrong_shapes(server):
    url, _ = server
    for raw in (b"{not json", b"[1, 2]", b"", b'"just a string"'):
        r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        check_error(r, 400)
    check_error(post(url, "/v1/completions", {"prompt": "hi", "model": "gpt-9"}), 404, "model")


# ----------------------------------------------------------------------------- transport limits
def raw_http(port: int, data: bytes, chunks: list[bytes] = ()) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                break
        got = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            got += part
            if b"\r\n\r\n" in got:
                head, _, body = got.partition(b"\r\n\r\n")
                m = re.search(rb"content-length: *(\d+)", head, re.I)
                if m and len(body) >= int(m.group(1)):
                    break
    status = int(got.split(b" ", 2)[1])
    return status, got


def test_oversized_body_by_content_length(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    status, resp = raw_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 2000000\r\n\r\n")
    assert status == 413 and b"request_too_large" in resp


def test_oversized_body_while_streaming(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 18 + [b"0\r\n\r\n"]     # 1.18 MB, no Content-Length
    status, resp = raw_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert status == 413 and b"request_too_large" in resp


def test_oversized_headers(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    for size in (40_000, 200_000):     # parsed, then refused by the app; refused by the parser (h11)
        status, _ = raw_http(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        assert status == 431, size
    assert httpx.get(url + "/health").status_code == 200


def test_api_key(tiny_llm):
    app = create_app(tiny_llm, kv_memory_mb=1, api_key="s3cret")
    with running(app) as (url, _):
        body = {"prompt": "hi", "max_tokens": 2}
        check_error(post(url, "/v1/completions", body), 401)
        check_error(post(url, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
        check_error(post(url, "/v1/completions", body, headers={"Authorization": "s3cret"}), 401)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert post(url, "/v1/completions", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/health").status_code == 200


# ----------------------------------------------------------------------------- load and failures
def stats(app):
    return app.state.jisu.engine.stats()


def test_client_disconnect_mid_stream_frees_blocks(tiny_llm):
    app = create_app(tiny_llm, kv_memory_mb=1)
    slow_down(app)
    with running(app) as (url, _):
        body = {"prompt": "the cat sat", "max_tokens": 200, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data:")]
                assert got
                assert stats(app)["kv_blocks_used"] > 0 and stats(app)["running"] == 1
        assert wait_for(lambda: stats(app)["kv_blocks_used"] == 0 and stats(app)["running"] == 0)
        metrics = httpx.get(url + "/metrics").text
        assert "jisu_kv_blocks_used 0.0" in metrics
        assert wait_for(lambda: 'jisu_request_finished_total{reason="abort"} 1.0' in httpx.get(url + "/metrics").text)


def test_client_disconnect_while_waiting_non_streaming(tiny_llm):
    app = create_app(tiny_llm, kv_memory_mb=1)
    app.state.jisu.settings.poll_disconnect_s = 0.05
    slow_down(app)
    with running(app) as (url, _):
        body = {"prompt": "the cat sat", "max_tokens": 200, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.5)
        assert wait_for(lambda: stats(app)["kv_blocks_used"] == 0 and stats(app)["running"] == 0)
        assert stats(app)["finished"] == 1 and stats(app)["steps"] < 150      # aborted, not run to the end
        text = httpx.get(url + "/metrics").text
        assert 'jisu_request_finished_total{reason="abort"} 1.0' in text
        assert 'jisu_requests_total{endpoint="/v1/completions",status="499"} 1.0' in text


def test_more_load_than_capacity_gets_429(tiny_llm):
    app = create_app(tiny_llm, kv_memory_mb=1, max_concurrency=1, max_queue=0)
    slow_down(app)
    with running(app) as (url, _):
        body = {"prompt": "the cat", "max_tokens": 40, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                busy = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
                check_error(busy, 429)
                assert busy.headers["retry-after"] == "1"
                assert r.read().endswith(b"data: [DONE]\n\n")
        assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
        assert 'jisu_requests_total{endpoint="/v1/completions",status="429"} 1.0' in httpx.get(url + "/metrics").text


def test_one_failing_request_does_not_take_the_batch_down(tiny_llm, monkeypatch):
    real = Sampler.sample_one

    def flaky(self, chunk, rows):
        if chunk.req.params.seed == 13 and chunk.sample:
            raise RuntimeError("boom")
        return real(self, chunk, rows)

    monkeypatch.setattr(Sampler, "sample_one", flaky)
    app = create_app(tiny_llm, kv_memory_mb=1)
    slow_down(app, 0.01)
    with running(app) as (url, _):
        bodies = [{"prompt": f"request {i}", "max_tokens": 20, "temperature": 0.7, "seed": s, "ignore_eos": True}
                  for i, s in enumerate((1, 13, 2, 3))]
        with cf.ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda b: post(url, "/v1/completions", b), bodies))
        assert [r.status_code for r in rs] == [200, 500, 200, 200]
        check_error(rs[1], 500)
        assert all(r.json()["usage"]["completion_tokens"] == 20 for r in rs if r.status_code == 200)
        # streamed: the failing request gets an error event, then [DONE]
        with httpx.stream("POST", url + "/v1/completions", json={**bodies[1], "stream": True}, timeout=30) as r:
            text = r.read().decode()
        assert '"internal_error"' in text and text.endswith("data: [DONE]\n\n")
        assert wait_for(lambda: stats(app)["kv_blocks_used"] == 0)


def test_same_seed_alone_or_batched(server):
    url, _ = server
    body = {"prompt": "once upon a time", "max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "seed": 1234,
            "ignore_eos": True, "logprobs": 0}
    alone = post(url, "/v1/completions", body).json()["choices"][0]
    others = [{**body, "seed": 7 + i, "prompt": f"noise {i} " * (i + 1)} for i in range(5)]
    with cf.ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda b: post(url, "/v1/completions", b), [*others[:3], body, *others[3:]]))
    batched = rs[3].json()["choices"][0]
    assert batched["text"] == alone["text"]
    assert batched["logprobs"]["tokens"] == alone["logprobs"]["tokens"]


def test_n_choices_with_seed_differ_and_repeat(server):
    url, _ = server
    body = {"prompt": "a b c", "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 5, "ignore_eos": True}
    a = post(url, "/v1/completions", body).json()
    b = post(url, "/v1/completions", body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert len({c["text"] for c in a["choices"]}) > 1
    assert a["usage"]["completion_tokens"] == 36
    best = post(url, "/v1/completions", {**body, "n": 1, "best_of": 3}).json()
    assert len(best["choices"]) == 1 and best["usage"]["completion_tokens"] == 36


def sse_events(url, path, body):
    events = []
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("stop", [None, ["e"]])
def test_stream_equals_non_stream_completions(server, stop):
    url, _ = server
    body = {"prompt": "the quick brown fox", "max_tokens": 30, "temperature": 0, "logprobs": 2, "stop": stop,
            "ignore_eos": True}
    whole = post(url, "/v1/completions", body).json()
    events = sse_events(url, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    choices = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
    assert choices[-1]["finish_reason"] == whole["choices"][0]["finish_reason"]
    toks = [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert toks == whole["choices"][0]["logprobs"]["tokens"]
    assert events[-1]["usage"] == whole["usage"]


def test_stream_equals_non_stream_chat(server):
    url, _ = server
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
            "max_tokens": 25, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = post(url, "/v1/chat/completions", body).json()
    assert whole["object"] == "chat.completion"
    msg = whole["choices"][0]["message"]
    assert msg["role"] == "assistant"
    lp = whole["choices"][0]["logprobs"]["content"]
    assert len(lp) == whole["usage"]["completion_tokens"] and len(lp[0]["top_logprobs"]) == 2
    events = sse_events(url, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == msg["content"]
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals == [whole["choices"][0]["finish_reason"]]
    assert events[-1]["usage"] == whole["usage"]


def test_echo_scores_the_prompt(server, tiny_llm):
    url, _ = server
    prompt = "the theory of everything"
    ids = tiny_llm.tokenizer.encode(prompt)
    zero = post(url, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1,
                                          "temperature": 0}).json()["choices"][0]
    one = post(url, "/v1/completions", {"prompt": ids, "echo": True, "max_tokens": 1, "logprobs": 1,
                                         "temperature": 0}).json()["choices"][0]
    lz, lo = zero["logprobs"], one["logprobs"]
    assert zero["text"] == prompt and one["text"].startswith(prompt)
    assert len(lz["tokens"]) == len(ids) and len(lo["tokens"]) == len(ids) + 1
    assert lz["token_logprobs"][0] is None and lz["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lz["token_logprobs"][1:])
    assert lo["token_logprobs"][:len(ids)] == pytest.approx([None] + lz["token_logprobs"][1:])
    assert lz["text_offset"][0] == 0 and lz["text_offset"] == sorted(lz["text_offset"])
    assert all(len(t) == 1 for t in lz["top_logprobs"][1:])
    # echo without logprobs, and streamed echo
    plain = post(url, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0}).json()
    assert plain["choices"][0]["text"] == prompt and plain["choices"][0]["logprobs"] is None
    events = sse_events(url, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1,
                                                 "stream": True})
    assert events[0]["choices"][0]["text"] == prompt
    assert events[0]["choices"][0]["logprobs"]["token_logprobs"] == lz["token_logprobs"]


def test_models_health_metrics(server):
    url, _ = server
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for name in ("jisu_requests_total", "jisu_prompt_tokens_total", "jisu_generation_tokens_total",
                 "jisu_queue_length", "jisu_running_requests", "jisu_kv_blocks_used", "jisu_kv_blocks_total",
                 "jisu_time_to_first_token_seconds_bucket", "jisu_time_per_output_token_seconds_bucket"):
        assert name in text


# ----------------------------------------------------------------------------- SIGTERM drain
SERVE_SLOW = """
import sys, time
import jisu
from jisu.engine.native_runner import NativeRunner
from jisu.serve.server import serve
real = NativeRunner.run
def slow(self, step, kv):
    time.sleep(0.02)
    return real(self, step, kv)
NativeRunner.run = slow
sys.exit(serve(jisu.load(sys.argv[1]), "127.0.0.1", int(sys.argv[2]), kv_memory_mb=1))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SLOW, tiny_path, str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        assert wait_for(up, timeout=120, interval=0.2), proc.stdout.read1() if proc.poll() is not None else "timeout"
        body = {"prompt": "the cat", "max_tokens": 150, "stream": True, "ignore_eos": True}
        result: dict = {}

        def stream():
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                result["first"] = next(ln for ln in lines if ln.startswith("data:"))
                started.set()
                result["rest"] = list(lines)

        started = threading.Event()
        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(url + "/v1/models", timeout=5).status_code == 503, timeout=10)
        r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        check_error(r, 503)
        assert httpx.get(url + "/health").status_code == 503
        t.join(60)
        assert "data: [DONE]" in result["rest"]
        chunks = [json.loads(x[6:]) for x in [result["first"], *result["rest"]] if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
