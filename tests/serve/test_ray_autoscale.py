"""Ray Serve autoscaling: a deployment of 1 to 2 one-thread replicas of the default model on a local
Ray (2 CPUs, loopback) gains its second replica under a load above its target of ongoing requests,
and serves through both. Skipped without ray."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from .test_ray import HAVE_RAY, REQUEST_TIMEOUT_S, replica_pids, scrape

UPSCALE_WAIT_S = 240          # metrics, the decision and a replica's model load on a loaded machine


@pytest.fixture(scope="module")
def autoscaled(default_gguf):
    if not HAVE_RAY:
        pytest.skip("Ray Serve not installed (pip install 'jisu[ray]')")
    from jisu.serve.ray_serve import RayServeConfig, deploy, start_ray, undeploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ray(num_cpus=2)
    try:
        cfg = RayServeConfig(model=default_gguf, replicas=1, threads=1, min_replicas=1, max_replicas=2,
                             target_ongoing_requests=1,
                             autoscaling_kw={"upscale_delay_s": 0, "look_back_period_s": 2,
                                             "metrics_interval_s": 0.5, "downscale_delay_s": 600},
                             app_kw={"max_concurrency": 8, "max_queue": 32, "kv_memory_mb": 64})
        deploy(cfg, "127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        undeploy(shutdown=True)


@pytest.mark.e2e
def test_load_adds_a_replica(autoscaled):
    import httpx

    assert len(replica_pids(autoscaled, want=1, wait_s=30)) == 1
    model = httpx.get(autoscaled + "/v1/models", timeout=30).json()["data"][0]["id"]
    stop = threading.Event()
    outcomes: list[str] = []

    def stream(i: int) -> None:
        """Streamed completions one after another until told to stop (each bounded in time)."""
        while not stop.is_set():
            body = {"model": model, "prompt": f"Load {i}: a long story", "max_tokens": 256, "ignore_eos": True,
                    "temperature": 0.7, "stream": True}
            try:
                with httpx.stream("POST", autoscaled + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as r:
                    outcomes.append(str(r.status_code))
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break
            except httpx.HTTPError as e:
                outcomes.append(type(e).__name__)

    workers = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + UPSCALE_WAIT_S
        pids: dict[str, int] = {}
        while time.monotonic() < deadline:
            pids = replica_pids(autoscaled, want=2, wait_s=0)
            if len(pids) == 2:
                break
            time.sleep(2)
        assert len(pids) == 2, f"no second replica within {UPSCALE_WAIT_S} s: {pids}"
    finally:
        stop.set()
        for w in workers:
            w.join(REQUEST_TIMEOUT_S + 10)
    assert not any(w.is_alive() for w in workers)
    assert outcomes and all(o == "200" for o in outcomes), outcomes
    # the new replica generates too (its generated-token counter moves), and requests still succeed
    generated = {}
    for i in range(8):
        r = httpx.post(autoscaled + "/v1/completions", json={"model": model, "prompt": f"After {i}:", "max_tokens": 4},
                       timeout=REQUEST_TIMEOUT_S)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        generated = scrape(autoscaled, "jisu_generation_tokens_total")
        if len(generated) == 2 and all(v > 0 for v in generated.values()):
            break
    assert len(generated) == 2 and all(v > 0 for v in generated.values()), generated
