"""`jisu serve --replicas N`: the OpenAI API served by N engine replicas as a Ray Serve application:
one deployment whose replicas each run jisu's own app around their own engine threads and KV pool,
reached straight from Serve's proxy, and routing by prompt prefix among themselves (ray_ingress.py)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import JisuError
from .ray_ingress import SERVED_BY, error_body, merge_metrics  # noqa: F401 - merge_metrics: part of this module's API

log = logging.getLogger("jisu.serve")
APP_NAME = "jisu"
ROUTER_CLASS = "jisu.serve.ray_router.PrefixHashRouter"   # by name: imported, so /metrics finds its routers


def require_ray():
    """(ray, ray.serve), or a JisuError naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise JisuError("serving on Ray needs Ray Serve: pip install 'jisu[ray]'") from None
    return ray, serve


@dataclass
class RayServeConfig:
    """What `jisu serve --replicas` deploys: the model (loaded by every replica), per-replica engine
    and app settings, and the replica count or autoscaling bounds."""
    model: str | None = None
    replicas: int = 1
    threads: int = 1                                  # engine threads per replica (its Ray CPUs too)
    min_replicas: int | None = None                   # autoscaling, when min/max is given
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    autoscaling_kw: dict = field(default_factory=dict)  # more autoscaling_config: upscale_delay_s, ...
    load_kw: dict = field(default_factory=dict)       # jisu.load options: precise, fast, isa
    app_kw: dict = field(default_factory=dict)        # create_app options: api_key, max_concurrency, ...

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def check(self) -> None:
        if self.replicas < 1 or self.threads < 1:
            raise JisuError(f"--replicas and --threads must be >= 1 (got {self.replicas}, {self.threads})")
        lo, hi = self.min_replicas, self.max_replicas
        if (lo is not None and lo < 0) or (hi is not None and hi < max(1, lo or 0)):
            raise JisuError(f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1 (got {lo}, {hi})")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise JisuError("--target-ongoing-requests must be > 0")

    def engine_options(self) -> dict:
        """The engine deployment's Ray Serve options."""
        per_replica = self.app_kw.get("max_concurrency", 64) + self.app_kw.get("max_queue", 256)
        opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.threads}, "max_ongoing_requests": per_replica,
                                "health_check_period_s": 5, "health_check_timeout_s": 30,
                                "graceful_shutdown_timeout_s": 10}
        if self.autoscaling:
            lo = self.min_replicas if self.min_replicas is not None else 1
            hi = self.max_replicas if self.max_replicas is not None else max(lo, self.replicas)
            opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                          "initial_replicas": min(max(self.replicas, lo), hi),
                                          "target_ongoing_requests": self.target_ongoing_requests or 16,
                                          **self.autoscaling_kw}
        else:
            opts["num_replicas"] = self.replicas
        return opts

    def most_replicas(self) -> int:
        return max(self.replicas, self.max_replicas or 0)


class EngineReplica:
    """One engine replica: jisu's FastAPI app around its own engine. Serve's proxy calls its ASGI
    app (`__serve_build_asgi_app__`: ray_ingress.RoutedApp); a request another replica forwards
    arrives at `handle`, which streams the response (start, then body bytes); cancelling it is the
    client going away."""

    def __init__(self, config: dict):
        ray, serve = require_ray()
        from ..api import load
        from .app import create_app

        cfg = RayServeConfig(**config)
        llm = load(cfg.model, threads=cfg.threads, **cfg.load_kw)
        self.jisu_app = create_app(llm, **cfg.app_kw)
        self.state = self.jisu_app.state.jisu
        self.state.engine.start()      # the app's lifespan is not run here: the replica owns the engine
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self._deployment = (ctx.deployment, ctx.app_name)
        self.node_id = ray.get_runtime_context().get_node_id()
        self._handle = None
        self.routed = None

    def __serve_build_asgi_app__(self):
        from .ray_ingress import RoutedApp

        self.routed = RoutedApp(self)
        return self.routed

    def self_handle(self):
        """A handle to this replica's own deployment (forwarding, per-replica /metrics)."""
        if self._handle is None:
            _, serve = require_ray()
            self._handle = serve.get_deployment_handle(*self._deployment)
        return self._handle

    async def handle(self, req: dict):
        """One HTTP request (method, path, query, headers, body) through the app: yields
        ("start", status, headers), then the body in chunks (what is ready, coalesced)."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body = [req.get("body", b"")]

        async def receive():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            out.put_nowait(message)

        async def run():
            try:
                await self.jisu_app(_scope(req), receive, send)
            finally:
                out.put_nowait(None)

        task = asyncio.get_running_loop().create_task(run())
        started = False
        if self.routed is not None:
            self.routed.ongoing += 1
        try:
            while True:
                batch = [await out.get()]
                while not out.empty():                   # coalesce what is ready into one stream item
                    batch.append(out.get_nowait())
                chunk, end = b"", False
                for m in batch:
                    if m is None:
                        end = True
                    elif m["type"] == "http.response.start":
                        started = True
                        yield ("start", m["status"], [*m.get("headers", []), (SERVED_BY, self.replica_id.encode())])
                    elif m["type"] == "http.response.body":
                        chunk += m.get("body", b"")
                if chunk:
                    yield chunk
                if end:
                    if not started:
                        yield ("start", 500, [(b"content-type", b"application/json")])
                        yield error_body("the replica failed to answer", "internal_error")
                    return
        finally:
            if self.routed is not None:
                self.routed.ongoing -= 1
            gone.set()
            if not task.done():
                task.cancel()        # the app's generators abort their engine requests on the way out

    def metrics_text(self, payload: dict | None = None) -> dict:
        from .ray_router import routing_decisions

        return {"replica": self.replica_id, "node": self.node_id, "pid": os.getpid(),
                "text": self.state.metrics.render().decode(), "decisions": routing_decisions()}

    def stats(self, payload: dict | None = None) -> dict:
        return {"replica": self.replica_id, "pid": os.getpid(), **self.state.engine.stats()}

    def check_health(self) -> None:
        if not self.state.engine.running:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.engine.shutdown()


def _scope(req: dict) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.get("method", "GET"), "scheme": "http", "path": req.get("path", "/"),
            "raw_path": req.get("path", "/").encode(), "query_string": req.get("query", b""), "root_path": "",
            "headers": [(bytes(k), bytes(v)) for k, v in req.get("headers", [])],
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}}


def build_app(cfg: RayServeConfig):
    """The Ray Serve application: the EngineReplica deployment as its own HTTP ingress (the proxy
    streams from the replica it calls; the replicas route by prefix among themselves through
    PrefixHashRouter)."""
    _, serve = require_ray()
    from ray.serve.config import RequestRouterConfig

    opts = cfg.engine_options()
    # the replica's request code on Serve's own event loop: no thread hop per streamed message
    opts["ray_actor_options"] = {**opts["ray_actor_options"],
                                 "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
    engine = serve.deployment(serve.ingress()(EngineReplica), name="JisuEngine").options(
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS,
                                                  request_routing_stats_period_s=5), **opts)
    return engine.bind(asdict(cfg))


def start_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int = 256):
    """Joins the Ray cluster at `address`, or starts a local one (this machine's CPUs, a
    modest object store, no dashboard)."""
    ray, _ = require_ray()
    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=object_store_mb * 2**20, log_to_driver=False)
    return ray


def deploy(cfg: RayServeConfig, host: str = "127.0.0.1", port: int = 8000):
    """Deploys the application on the connected cluster (Serve's proxy on host:port); returns the
    ingress handle once every replica is up."""
    _, serve = require_ray()
    cfg.check()
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)


def undeploy(shutdown: bool) -> None:
    ray, serve = require_ray()
    try:
        serve.delete(APP_NAME)
        if shutdown:
            serve.shutdown()
    finally:
        if shutdown:
            ray.shutdown()


def serve_on_ray(cfg: RayServeConfig, host: str = "127.0.0.1", port: int = 8000, *,
                 address: str | None = None, num_cpus: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then remove the application (and stop the local Ray)."""
    cfg.check()
    if address is None:
        need = cfg.threads * cfg.replicas
        have = num_cpus or os.cpu_count() or 1
        if need > have:
            raise JisuError(f"{cfg.replicas} replicas x {cfg.threads} threads need {need} CPUs; the local Ray "
                            f"has {have} (lower --replicas/--threads, or raise --ray-num-cpus)")
    start_ray(address, num_cpus)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(cfg, host, port)
        print(f"jisu: serving on Ray ({cfg.replicas} replicas) on http://{host}:{port}/v1", file=sys.stderr,
              flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        undeploy(shutdown=address is None)
    return 0
