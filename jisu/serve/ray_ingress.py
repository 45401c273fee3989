"""The HTTP side of an engine replica on Ray Serve: Serve's proxy hands each request straight to a
replica, which serves it in-process when the prefix router picks it, else forwards it to the picked
replica and relays the stream; /metrics merges every replica's metrics."""
from __future__ import annotations

import asyncio
import json
import logging

log = logging.getLogger("jisu.serve")
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}
_GENERATING = ("/v1/chat/completions", "/v1/completions")
SERVED_BY = b"x-jisu-replica"         # the replica whose engine generated the answer
INGRESS = b"x-jisu-ingress"           # the replica that took the request from Serve's proxy
BOOTSTRAP_S = 5.0          # how long a replica waits, once, for its router to learn the replicas


def error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()


class RoutedApp:
    """The replica's ASGI app (Serve runs it as the deployment's ingress). `replica` is the
    EngineReplica: its jisu app (`jisu_app`), id (`replica_id`) and a handle to its own deployment."""

    def __init__(self, replica, metrics_timeout_s: float = 15.0):
        self.replica = replica
        self.metrics_timeout_s = metrics_timeout_s
        self.ongoing = 0                     # generating requests in this replica (served or relayed)
        self._router_ready = False
        self._bootstrap: asyncio.Lock | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":              # the engine lives as long as the replica
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif m["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope.get("path", "/"), scope.get("method", "GET")
        if scope["type"] == "http" and path == "/metrics" and method == "GET":
            text = await self.metrics()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                                    (b"content-length", str(len(text)).encode())]})
            await send({"type": "http.response.body", "body": text})
            return
        if scope["type"] != "http" or method != "POST" or path not in _GENERATING:
            await self.replica.jisu_app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return                                   # the client left before its body arrived
        self.ongoing += 1
        try:
            hashes = _prefix(path, body)
            target = await self.pick(hashes)
            if target is None:
                await self.replica.jisu_app(scope, _replay(body, receive), self._tagged(send, served=True))
            else:
                await self.forward(target, scope, body, hashes, self._tagged(send, served=False))
        finally:
            self.ongoing -= 1

    def _tagged(self, send, served: bool):
        """`send` that names this replica in the response's headers: as the ingress, and as the
        server when it generates the answer itself (a forwarded answer names its own server)."""
        me = self.replica.replica_id.encode()
        extra = [(INGRESS, me)] + ([(SERVED_BY, me)] if served else [])

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
        return tagged

    async def pick(self, hashes: list[int]) -> str | None:
        """None to serve here, else the id of the replica the prefix router picks."""
        from .ray_router import local_router

        router = local_router()
        if router is None and not self._router_ready:
            router = await self._make_router()
        if router is None:
            return None
        rid = router.decide(hashes, self.replica.replica_id, self.ongoing - 1)
        return None if rid is None or rid == self.replica.replica_id else rid

    async def _make_router(self):
        """This process's router for its own deployment, made by one cheap call through the handle
        (once, bounded): until then, and with one replica, requests are served here."""
        from .ray_router import live_replica_ids, local_router

        if self._bootstrap is None:
            self._bootstrap = asyncio.Lock()
        async with self._bootstrap:
            if not self._router_ready:
                await self._call(self.replica.self_handle().stats, {"pin": self.replica.replica_id}, BOOTSTRAP_S)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + BOOTSTRAP_S
                while not live_replica_ids() and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                self._router_ready = True
        return local_router()

    async def forward(self, target: str, scope: dict, body: bytes, hashes: list[int], send) -> None:
        """The request through `target`'s `handle`, its answer relayed to `send`; a replica lost
        before answering is a 503, one lost mid-stream an SSE error event."""
        payload = {"method": scope.get("method", "POST"), "path": scope.get("path", "/"),
                   "query": scope.get("query_string", b""), "headers": list(scope.get("headers", [])),
                   "body": body, "prefix": hashes, "prefer": target}
        gen = self.replica.self_handle().options(stream=True).handle.remote(payload)
        try:
            try:
                _, status, headers = await gen.__anext__()
            except Exception as e:  # noqa: BLE001 - the replica died or could not be reached
                log.warning("replica unavailable: %s: %s", type(e).__name__, str(e)[:200])
                msg = error_body("the replica serving this request failed; retry", "replica_failed")
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                        (b"content-length", str(len(msg)).encode())]})
                await send({"type": "http.response.body", "body": msg})
                return
            headers = [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            try:
                async for chunk in gen:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                log.warning("replica lost during a stream: %s", type(e).__name__)
                await send({"type": "http.response.body", "more_body": True, "body": b"data: " + error_body(
                    "the replica serving this request failed; retry", "replica_failed") + b"\n\n"})
            await send({"type": "http.response.body", "body": b""})
        finally:
            gen.cancel()

    async def metrics(self) -> bytes:
        """Every live replica's metrics, labelled replica="<id>", and the routing decisions."""
        from .ray_router import live_replica_ids

        ids = live_replica_ids()
        if not ids:
            await self._make_router()
            ids = live_replica_ids() or [self.replica.replica_id]
        # one at a time: calls made while serving one request share its request id, and Ray's
        # router matches a routed replica to its waiting call by that id
        replies = []
        for rid in ids:
            if rid == self.replica.replica_id:
                replies.append(self.replica.metrics_text())
            else:
                replies.append(await self._call(self.replica.self_handle().metrics_text, {"pin": rid},
                                                self.metrics_timeout_s))
        replies = [r for r in replies if isinstance(r, dict)]
        decisions: dict[str, int] = {}
        for r in replies:
            for k, v in r.get("decisions", {}).items():
                decisions[k] = decisions.get(k, 0) + v
        return merge_metrics(replies, decisions)

    @staticmethod
    async def _call(method, payload, timeout_s: float):
        resp = method.remote(payload)
        try:
            return await asyncio.wait_for(_await(resp), timeout_s)
        except Exception as e:  # noqa: BLE001 - a replica that is gone or stuck is left out
            log.warning("no answer from a replica for %s: %s", payload or "any", type(e).__name__)
            resp.cancel()
            return None


async def _await(resp):
    return await resp


async def _read_body(receive) -> bytes | None:
    parts = []
    while True:
        m = await receive()
        if m["type"] == "http.disconnect":
            return None
        parts.append(m.get("body", b""))
        if not m.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the (already read) body once, then waits on the real one."""
    pending = [body]

    async def replayed():
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()
    return replayed


def _prefix(path: str, body: bytes) -> list[int]:
    from .ray_router import block_hashes, prompt_text

    try:
        return block_hashes(prompt_text(path, json.loads(body)))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return []                                    # the app answers the invalid body


def merge_metrics(replies: list[dict], decisions: dict[str, int] | None = None) -> bytes:
    """One Prometheus text of the replicas' own texts, each sample labelled with its replica."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    up = Metric("jisu_replica_up", "Engine replicas answering /metrics (1 each), by replica, node and pid", "gauge")
    for r in replies:
        up.add_sample("jisu_replica_up", {"replica": r["replica"], "node": r["node"], "pid": str(r["pid"])}, 1)
        for fam in text_string_to_metric_families(r["text"]):
            m = families.get(fam.name)
            if m is None:
                m = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            m.samples += [s._replace(labels={**s.labels, "replica": r["replica"]}) for s in fam.samples]
    routed = Metric("jisu_route_decisions", "Requests routed by this ingress, by reason", "counter")
    for reason, n in sorted((decisions or {}).items()):
        routed.add_sample("jisu_route_decisions_total", {"reason": reason}, n)

    class _Collector:
        def collect(self):
            return [up, routed, *families.values()]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return generate_latest(registry)
