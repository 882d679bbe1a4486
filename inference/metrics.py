"""Prometheus metrics of the inference service, on a registry of their own (several apps can share a process)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from core.http.observability import HttpMetrics

if TYPE_CHECKING:
    from inference.gate import GateResult

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 400, 800)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Implements the engine's observer interface, plus what the registry, deployer and routes report."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Requests by method, route and status, and their duration: the shared middleware's figures.
        self.http = HttpMetrics(r, "inference")
        self.ttft = Histogram(
            "conch_inference_time_to_first_token_seconds",
            "From submission to the engine to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "conch_inference_decode_tokens_per_second",
            "Per-request decode speed after the first token",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.generated = Counter(
            "conch_inference_generated_tokens",
            "Generated tokens (rate() gives aggregate tokens/s)",
            ["model"],
            registry=r,
        )
        self.queue = Gauge("conch_inference_queue_depth", "Requests waiting to join a batch", ["model"], registry=r)
        self.batch_size = Histogram(
            "conch_inference_batch_size", "Sequences per decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.completions = Counter(
            "conch_inference_completions", "Finished generations by reason", ["reason"], registry=r
        )
        self.cancelled = Counter(
            "conch_inference_cancelled", "Generations stopped because the client went away", registry=r
        )
        self.failures = Counter("conch_inference_failures", "Failures by kind", ["kind"], registry=r)
        self.swaps = Counter("conch_inference_swaps", "Deployments processed by result", ["result"], registry=r)
        self.swap_latency = Histogram(
            "conch_inference_swap_latency_seconds",
            "From a deployment's creation (publish) to serving it",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loads = Counter("conch_inference_model_loads", "Model loads by result", ["result"], registry=r)
        self.evictions = Counter("conch_inference_evictions", "Models unloaded to fit the memory budget", registry=r)
        self.loaded_models = Gauge("conch_inference_loaded_models", "Models in memory", registry=r)
        self.loaded_bytes = Gauge(
            "conch_inference_loaded_bytes",
            "Bytes the models in memory take: weights plus the KV cache each can fill",
            registry=r,
        )
        self.ready = Gauge("conch_inference_ready", "1 when /readyz answers 200", registry=r)
        self.agreement = Gauge(
            "conch_inference_fidelity_agreement",
            "Next-token agreement of the serving route with the fp32 reference on the golden prompts",
            ["model", "route"],
            registry=r,
        )
        self.max_kl = Gauge(
            "conch_inference_fidelity_max_kl",
            "Largest per-token KL divergence (nats) of the serving route from the fp32 reference",
            ["model", "route"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---------------------------------------------------------------------------- engine observer

    def queue_depth(self, model: str, depth: int) -> None:
        self.queue.labels(model).set(depth)

    def batch(self, model: str, size: int) -> None:
        self.batch_size.observe(size)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, model: str, count: int) -> None:
        self.generated.labels(model).inc(count)

    def finished(self, model: str, reason: str, decode_tokens_per_second: float | None) -> None:
        self.completions.labels(reason).inc()
        if reason == "cancelled":
            self.cancelled.inc()
        if decode_tokens_per_second is not None:
            self.decode_rate.observe(decode_tokens_per_second)

    def failure(self, kind: str) -> None:
        self.failures.labels(kind).inc()

    def fidelity(self, model: str, gate: GateResult) -> None:
        self._forget_fidelity(model)
        self.agreement.labels(model, gate.route).set(gate.fidelity.agreement)
        self.max_kl.labels(model, gate.route).set(gate.fidelity.max_kl)

    def _forget_fidelity(self, model: str) -> None:
        for gauge in (self.agreement, self.max_kl):
            for labels in [s.labels for metric in gauge.collect() for s in metric.samples]:
                if labels.get("model") == model:
                    with contextlib.suppress(KeyError):
                        gauge.remove(model, labels["route"])

    def forget_model(self, model: str) -> None:
        with contextlib.suppress(KeyError):
            self.queue.remove(model)
        self._forget_fidelity(model)
