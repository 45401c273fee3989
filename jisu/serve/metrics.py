"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jisu_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("jisu_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("jisu_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("jisu_request_finished", "Engine requests finished, by reason", ["reason"],
                                registry=r)
        self.ttft = Histogram("jisu_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("jisu_time_per_output_token_seconds", "Mean time per generated token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("jisu_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY, registry=r)
        stats = engine.stats
        Gauge("jisu_queue_length", "Requests waiting to be scheduled", registry=r).set_function(
            lambda: stats()["waiting"])
        Gauge("jisu_running_requests", "Requests holding KV blocks", registry=r).set_function(
            lambda: stats()["running"])
        Gauge("jisu_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(
            lambda: stats()["kv_blocks_used"])
        Gauge("jisu_kv_blocks_total", "KV cache blocks in the pool", registry=r).set_function(
            lambda: stats()["kv_blocks_total"])
        Gauge("jisu_preemptions", "Requests preempted (recomputed) since start", registry=r).set_function(
            lambda: stats()["preemptions"])
        Gauge("jisu_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache since start",
              registry=r).set_function(lambda: stats()["prefix_hit_tokens"])
        for key, help_ in (("spec_drafted_tokens", "Speculative draft tokens verified since start"),
                           ("spec_accepted_tokens", "Speculative draft tokens accepted since start"),
                           ("spec_acceptance", "Accepted / drafted speculative tokens since start"),
                           ("spec_tokens_per_verify", "Tokens a request gains per verify step that carries drafts"),
                           ("spec_time_saved_s", "Estimated decode seconds saved by speculation (cost model)")):
            Gauge("jisu_" + key, help_, registry=r).set_function(lambda key=key: stats().get(key, 0.0))

    def observe_finished(self, out) -> None:
        """One engine request finished (called on the event loop with its last output)."""
        self.finished.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.generation_tokens.inc(out.num_generated_tokens)
        if out.first_token_time is not None:
            self.ttft.observe(out.first_token_time - out.arrival_time)
            if out.finish_time is not None:
                self.e2e.observe(out.finish_time - out.arrival_time)
                if out.num_generated_tokens > 1:
                    self.tpot.observe((out.finish_time - out.first_token_time) / (out.num_generated_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
