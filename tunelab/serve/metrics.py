"""Prometheus metrics of one server (its own registry, so several servers in a process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
KNOWN_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/classify",
    "/v1/models",
    "/admin/adapters",
    "/health",
    "/metrics",
}


class ServeMetrics:
    def __init__(self, batcher, registry_of_adapters):
        self.registry = r = CollectorRegistry()
        self.http = Counter("tunelab_http_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.requests = Counter(
            "tunelab_requests",
            "Model requests by model (adapter) and outcome",
            ["model", "route", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "tunelab_request_latency_seconds",
            "Request latency",
            ["model", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "tunelab_time_to_first_token_seconds",
            "Streamed requests: time to the first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "Prompt tokens by model", ["model"], registry=r)
        self.completion_tokens = Counter(
            "tunelab_completion_tokens", "Generated tokens by model", ["model"], registry=r
        )
        self.batch_rows = Histogram(
            "tunelab_batch_rows", "Sequences per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.tokens_per_second = Gauge(
            "tunelab_tokens_per_second", "Generated tokens per second of the last finished batch", registry=r
        )
        queue = Gauge("tunelab_queue_depth", "Requests waiting for a batch", registry=r)
        queue.set_function(batcher.queue_depth)
        running = Gauge("tunelab_running_sequences", "Sequences in the running batch", registry=r)
        running.set_function(batcher.running_rows)
        loaded = Gauge("tunelab_models_loaded", "Served models: the base and its adapters", registry=r)
        loaded.set_function(lambda: len(registry_of_adapters.handles()))
        self.inflight = Gauge(
            "tunelab_inflight_requests", "Requests accepted and not yet answered", ["model"], registry=r
        )

    def on_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def on_response(self, scope, status: int) -> None:
        path = scope["path"]
        if path.startswith("/admin/adapters"):
            path = "/admin/adapters"
        self.http.labels(path if path in KNOWN_PATHS else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
