"""The server's Prometheus metrics (`prometheus_client`), in a registry of their own (one per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

OUTCOMES = ("ok", "cancelled", "error")  # ok: served to its end; cancelled: the client left; error: refused late


class Metrics:
    """Counters and gauges that `GET /metrics` shows; `text()` is the Prometheus text format."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("anjax_requests", "Requests ended, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("anjax_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generation_tokens = Counter("anjax_generation_tokens", "Tokens generated", registry=r)
        self.queue_length = Gauge("anjax_queue_length", "Requests waiting for a slot", registry=r)
        self.slots_in_use = Gauge("anjax_slots_in_use", "Decode slots holding a request", registry=r)
        self.slots_total = Gauge("anjax_slots_total", "Decode slots", registry=r)
        self.cache_slots_held = Gauge("anjax_cache_slots_held", "KV cache slots held by live requests", registry=r)
        self.prefill_seconds = Counter("anjax_prefill_seconds", "Device seconds spent in prefill", registry=r)
        self.decode_seconds = Counter("anjax_decode_seconds", "Device seconds spent in decode steps", registry=r)
        self.prefill_rate = Gauge(
            "anjax_prefill_tokens_per_second", "Prompt tokens per second of the last prefill", registry=r
        )
        self.decode_rate = Gauge(
            "anjax_decode_tokens_per_second", "Tokens per second of the last decode step (all slots)", registry=r
        )

    def prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_seconds.inc(seconds)
        self.prefill_rate.set(tokens / max(seconds, 1e-9))

    def decode(self, tokens: int, seconds: float) -> None:
        self.decode_seconds.inc(seconds)
        self.decode_rate.set(tokens / max(seconds, 1e-9))

    def text(self) -> bytes:
        return generate_latest(self.registry)
