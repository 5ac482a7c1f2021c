"""What operators read: the server's figures in Prometheus' text format (`GET /metrics`), one registry per app.

    firebolt_vl_requests_total{status}               chat-completion requests answered, by HTTP status
    firebolt_vl_queue_length                          requests waiting for the engine
    firebolt_vl_running_rows                          rows being decoded now
    firebolt_vl_generated_tokens_total                tokens generated (all rows)
    firebolt_vl_time_to_first_token_seconds           from queueing to a row's first token (histogram)
    firebolt_vl_time_per_output_token_seconds         between two tokens of a row (histogram)
    firebolt_vl_model_loaded                          1 once the model is loaded, 0 while starting or after shutdown
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import TokenTiming

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("firebolt_vl_requests", "Chat-completion requests answered, by HTTP status",
                                ["status"], registry=r)
        self.queue = Gauge("firebolt_vl_queue_length", "Requests waiting for the engine", registry=r)
        self.running = Gauge("firebolt_vl_running_rows", "Rows being decoded now", registry=r)
        self.tokens = Counter("firebolt_vl_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("firebolt_vl_time_to_first_token_seconds", "From queueing to a row's first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("firebolt_vl_time_per_output_token_seconds", "Between two tokens of one row",
                              buckets=TPOT_BUCKETS, registry=r)
        self.loaded = Gauge("firebolt_vl_model_loaded", "1 once the model is loaded and the engine runs", registry=r)

    def watch(self, engine) -> None:
        """Read the engine's queue and running rows at scrape time, and take its token timings."""
        self.queue.set_function(engine.queue_length)
        self.running.set_function(lambda: engine.running)
        engine.timing = TokenTiming(first_token=self._first_token, next_token=self._next_token)

    def _first_token(self, seconds: float) -> None:
        self.tokens.inc()
        self.ttft.observe(seconds)

    def _next_token(self, seconds: float) -> None:
        self.tokens.inc()
        self.tpot.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
