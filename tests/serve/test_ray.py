"""`jisu serve --replicas` on Ray Serve: a local Ray on loopback (started and stopped here, 2 CPUs),
2 replicas of the default model with 1 thread each; the openai client through them, prefix affinity
(one replica's prefix-cache hits move), and kill -9 of a replica under load. Skipped without ray."""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
import uuid

import pytest

from jisu.errors import JisuError

try:
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray Serve not installed (pip install 'jisu[ray]')")
REQUEST_TIMEOUT_S = 90


def test_missing_ray_names_the_extra(monkeypatch, capsys):
    from jisu import cli
    from jisu.serve.ray_serve import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(JisuError, match=r"jisu\[ray\]"):
        require_ray()
    assert cli.main(["serve", "--replicas", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "jisu[ray]" in err and len(err.splitlines()) == 1


def test_config_options():
    from jisu.serve.ray_serve import RayServeConfig

    fixed = RayServeConfig(replicas=3, threads=2, app_kw={"max_concurrency": 4, "max_queue": 6}).engine_options()
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["max_ongoing_requests"] == 10 and "autoscaling_config" not in fixed
    auto = RayServeConfig(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=8).engine_options()
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                          "target_ongoing_requests": 8}
    with pytest.raises(JisuError, match="--max-replicas"):
        RayServeConfig(min_replicas=3, max_replicas=2).check()


@needs_ray
def test_prefix_hashes_and_choice():
    from jisu.serve.ray_router import BLOCK_CHARS, RING_BLOCKS, block_hashes, choose, prompt_text

    system = {"role": "system", "content": "You answer questions about geography in detail. " * 8}
    a = prompt_text("/v1/chat/completions", {"messages": [system, {"role": "user", "content": "Paris?"}]})
    b = prompt_text("/v1/chat/completions", {"messages": [system, {"role": "user", "content": "Rome?"}]})
    ha, hb = block_hashes(a), block_hashes(b)
    shared = len(system["content"]) // BLOCK_CHARS
    assert ha[:shared] == hb[:shared] and len(ha) >= RING_BLOCKS
    assert block_hashes("short") == [] and prompt_text("/v1/completions", {"prompt": ["x" * 70]}) == "x" * 70
    loads = {"r1": 0, "r2": 0, "r3": 0}
    first, why = choose(ha, loads, {})
    assert why == "ring" and choose(hb, loads, {})[0] == first     # same first blocks -> same replica
    assert choose(ha, loads, {ha[-1]: "r2"}) == ("r2", "affinity")  # a remembered prefix wins
    busy = {**loads, first: 9}
    other, why = choose(ha, busy, {})
    assert other != first and why == "overflow"                     # over the load bound: the next one
    assert choose([], loads, {})[1] == "balance"


def test_merge_metrics_labels_each_replica():
    from jisu.serve.ray_serve import merge_metrics

    text = "# HELP jisu_prefix_cache_hit_tokens hits\n# TYPE jisu_prefix_cache_hit_tokens gauge\n" \
           "jisu_prefix_cache_hit_tokens {}\n"
    out = merge_metrics([{"replica": "a", "node": "n", "pid": 1, "text": text.format(5)},
                         {"replica": "b", "node": "n", "pid": 2, "text": text.format(7)}], {"ring": 3}).decode()
    assert 'jisu_prefix_cache_hit_tokens{replica="a"} 5.0' in out
    assert 'jisu_prefix_cache_hit_tokens{replica="b"} 7.0' in out
    assert out.count("# TYPE jisu_prefix_cache_hit_tokens") == 1
    assert 'jisu_route_decisions_total{reason="ring"} 3.0' in out and 'pid="2"' in out


# --- a local Ray cluster -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_base(default_gguf):
    if not HAVE_RAY:
        pytest.skip("Ray Serve not installed (pip install 'jisu[ray]')")
    from jisu.serve.ray_serve import RayServeConfig, deploy, start_ray, undeploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ray(num_cpus=2)
    try:
        cfg = RayServeConfig(model=default_gguf, replicas=2, threads=1,
                             app_kw={"max_concurrency": 8, "max_queue": 32, "kv_memory_mb": 64})
        deploy(cfg, "127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        undeploy(shutdown=True)


def samples(base: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of one metric in the aggregated /metrics."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=30).text
    out = []
    for m in re.finditer(rf'^{name}\{{([^}}]*)\}} (\S+)$', text, re.M):
        out.append((dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))), float(m.group(2))))
    return out


def scrape(base: str, name: str) -> dict[str, float]:
    """{replica: value} of one metric."""
    return {labels["replica"]: v for labels, v in samples(base, name) if "replica" in labels}


def replica_pids(base: str, want: int = 2, wait_s: float = 60) -> dict[str, int]:
    """{replica: pid} from jisu_replica_up, asked again (bounded) until `want` replicas answer."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = {labels["replica"]: int(labels["pid"]) for labels, _ in samples(base, "jisu_replica_up")}
        if len(pids) >= want or time.monotonic() > deadline:
            return pids
        time.sleep(1)


@needs_ray
@pytest.mark.e2e
def test_openai_client_through_replicas(ray_base):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=ray_base + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 8
    streamed = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == r.choices[0].message.content
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.choices[0].text
    s = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  stream=True)
    assert "".join(ch.choices[0].text for ch in s if ch.choices) == c.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=msgs, max_tokens=-1)
    assert len(replica_pids(ray_base)) == 2


@needs_ray
@pytest.mark.e2e
def test_shared_prefix_lands_on_one_replica(ray_base):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=ray_base + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    model = client.models.list().data[0].id
    tag = uuid.uuid4().hex
    system = (f"Session {tag}. You are a careful assistant for a museum of maritime history; answer visitors' "
              "questions about ships, harbours, navigation instruments and the lives of sailors in two "
              "sentences, politely, without inventing facts, and mention the gallery where the topic is shown. ")
    before = scrape(ray_base, "jisu_prefix_cache_hit_tokens")
    for q in ("Who built the oldest ship here?", "How did sailors find north?", "What is a sextant?",
              "Where are the anchors shown?"):
        client.chat.completions.create(model=model, messages=[{"role": "system", "content": system},
                                                            {"role": "user", "content": q}],
                                       max_tokens=4, temperature=0)
    after = scrape(ray_base, "jisu_prefix_cache_hit_tokens")
    moved = {r: after[r] - before.get(r, 0.0) for r in after if after[r] > before.get(r, 0.0)}
    assert len(moved) == 1, (before, after)
    assert next(iter(moved.values())) >= 3 * 16        # three requests each reused at least a block


@needs_ray
@pytest.mark.e2e
def test_killed_replica_fails_cleanly_and_comes_back(ray_base):
    import httpx

    pids = replica_pids(ray_base)
    assert len(pids) == 2
    model = httpx.get(ray_base + "/v1/models", timeout=30).json()["data"][0]["id"]
    results: dict[int, tuple[str, float]] = {}
    route: dict[int, set[str]] = {}                # request -> the replicas it passes through
    streaming = threading.Semaphore(0)

    def one(i: int) -> None:
        t0 = time.monotonic()
        outcome = "error"
        try:
            body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": 96, "temperature": 0.7,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", ray_base + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
                route[i] = {r.headers.get("x-jisu-ingress"), r.headers.get("x-jisu-replica")}
                first = True
                for line in r.iter_lines():
                    if first:
                        streaming.release()
                        first = False
                    if line.startswith("data: [DONE]"):
                        outcome = "ok"
                    elif '"error"' in line:
                        outcome = "error"
                        break
        except httpx.HTTPError:
            outcome = "error"
        finally:
            results[i] = (outcome, time.monotonic() - t0)

    workers = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(6)]
    for w in workers:
        w.start()
    for _ in range(len(workers)):
        assert streaming.acquire(timeout=REQUEST_TIMEOUT_S)
    assert all(len(r) in (1, 2) and set(r) <= set(pids) for r in route.values()), (route, pids)
    # the victim: the replica the most streams pass through, among those that leave a stream untouched
    # (a stream through both replicas ends with either)
    spared = {rid: [i for i, r in route.items() if rid not in r] for rid in pids}
    victim = max(pids, key=lambda rid: (bool(spared[rid]), len(route) - len(spared[rid])))
    os.kill(pids[victim], signal.SIGKILL)
    for w in workers:
        w.join(REQUEST_TIMEOUT_S + 30)
        assert not w.is_alive(), "a request hung after its replica was killed"
    assert len(results) == 6 and all(t < REQUEST_TIMEOUT_S + 5 for _, t in results.values())
    hit = [i for i in route if i not in spared[victim]]
    assert not hit or any(results[i][0] == "error" for i in hit), (results, route, victim)
    assert all(results[i][0] == "ok" for i in spared[victim]), (results, route, victim)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        now = replica_pids(ray_base, wait_s=0)
        if len(now) == 2 and pids[victim] not in now.values():
            break
        time.sleep(2)
    else:
        pytest.fail(f"the killed replica was not replaced: {replica_pids(ray_base)}")
    for i in range(4):
        r = httpx.post(ray_base + "/v1/completions", json={"model": model, "prompt": f"After {i}:", "max_tokens": 4},
                       timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


@needs_ray
@pytest.mark.e2e
def test_client_disconnect_aborts_in_the_engine(ray_base):
    import httpx

    model = httpx.get(ray_base + "/v1/models", timeout=30).json()["data"][0]["id"]
    aborted = sum(v for labels, v in samples(ray_base, "jisu_request_finished_total") if labels.get("reason") == "abort")
    body = {"model": model, "prompt": "Count slowly:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ray_base + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
        assert r.status_code == 200
        for n, _ in zip(range(3), r.iter_lines()):     # a few events, then hang up
            pass
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = sum(v for labels, v in samples(ray_base, "jisu_request_finished_total") if labels.get("reason") == "abort")
        if now > aborted and not any(scrape(ray_base, "jisu_running_requests").values()):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the engine request was not aborted after the client went away")
