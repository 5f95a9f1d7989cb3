"""The server's `tributary_serve_*` Ray metrics (Prometheus, the Ray dashboard, Grafana); like
the trainer's, each carries a `run` tag, and per-replica ones a `replica` tag."""

from __future__ import annotations

# Latency buckets (seconds): a short completion on a CPU to a long answer of a large model.
LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class ServeMetrics:
    def __init__(self, *, run: str, replica: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        def metric(kind, name: str, description: str, *tags: str, **extra):
            made = kind(name, description=description, tag_keys=(*tags, "run"), **extra)
            made.set_default_tags({"run": run})
            return made

        self.replica = replica
        self.requests = metric(Counter, "tributary_serve_requests_total",
                               "Requests answered, by route and HTTP status", "route", "code")
        self.latency = metric(Histogram, "tributary_serve_request_seconds",
                              "Request latency (to the last token)", "route",
                              boundaries=LATENCY_BOUNDARIES)
        self.tokens = metric(Counter, "tributary_serve_tokens_total",
                             "Prompt and completion tokens", "kind")
        self.version = metric(Gauge, "tributary_serve_version",
                              "Version each replica serves", "replica")
        self.swap_seconds = metric(Gauge, "tributary_serve_swap_seconds",
                                   "Seconds of the last swap (load beside, then switch)",
                                   "replica")

    def request(self, *, route: str, code: int, seconds: float, prompt_tokens: int = 0,
                completion_tokens: int = 0) -> None:
        self.requests.inc(1.0, tags={"route": route, "code": str(code)})
        self.latency.observe(seconds, tags={"route": route})
        for kind, count in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if count > 0:  # Ray counters take positive increments only
                self.tokens.inc(float(count), tags={"kind": kind})

    def swapped(self, *, version: str, seconds: float | None) -> None:
        self.version.set(int(version.lstrip("v")), tags={"replica": self.replica})
        if seconds is not None:
            self.swap_seconds.set(seconds, tags={"replica": self.replica})
