"""Prometheus metrics of one app: lora:* and the vllm:* names that inference gateways and routers read."""
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class Metrics:
    """Metrics in a registry of their own (an app per test must not collide).

    Engine state (running, waiting, KV cache, token totals, LoRA adapters) is read from `engine.stats()` at
    scrape time; latencies and finished requests are observed as the Outputs reach the event loop.
    The gauges are exported twice: as lora:* and under vLLM's names, so that several `lora serve` replicas
    can sit behind a router that reads vLLM's metrics (Gateway API Inference Extension, llm-d, KServe).
    """

    def __init__(self, engine: Any) -> None:
        self.engine, self.registry = engine, CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]  # a collector: it has collect()
        self.ttft = Histogram("lora:time_to_first_token_seconds", "Time from arrival to the first token",
                              ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("lora:inter_token_latency_seconds", "Time between two tokens of one request",
                             ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lora:e2e_request_latency_seconds", "Time from arrival to the last token",
                             ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("lora:request_success", "Finished requests", ["task", "finished_reason"],
                                registry=self.registry)
        self.reasons: dict[str, set[str]] = {}  # task -> finish reasons it has a counter for

    def finish(self, task: str, reason: str) -> None:
        self.reasons.setdefault(task, set()).add(reason)
        self.finished.labels(task, reason).inc()

    def forget(self, task: str) -> None:
        """Drop an unloaded task's labels: a server that loads and unloads many adapters must not grow."""
        for histogram in (self.ttft, self.itl, self.e2e):
            try:
                histogram.remove(task)
            except KeyError:
                pass
        for reason in self.reasons.pop(task, ()):
            self.finished.remove(task, reason)

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        for prefix in ("lora", "vllm"):
            yield GaugeMetricFamily(f"{prefix}:num_requests_running", "Requests in the running batch",
                                    stats["running"])
            yield GaugeMetricFamily(f"{prefix}:num_requests_waiting", "Requests waiting to be scheduled",
                                    stats["waiting"])
            yield GaugeMetricFamily(f"{prefix}:kv_cache_usage_perc", "Fraction of the KV cache in use (0-1)",
                                    stats["kv_cache_usage"])
            yield CounterMetricFamily(f"{prefix}:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      stats["prefix_cache_queries"])
            yield CounterMetricFamily(f"{prefix}:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                      stats["prefix_cache_hits"])
        rate = stats["prefix_cache_hits"] / stats["prefix_cache_queries"] if stats["prefix_cache_queries"] else 0
        yield GaugeMetricFamily("lora:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache, over those "
                                "looked up, since the start (0-1)", rate)
        yield GaugeMetricFamily("lora:prefix_cache_usage_perc", "Fraction of the prefix cache's blocks in use (0-1)",
                                stats["prefix_cache_usage"])
        yield CounterMetricFamily("lora:prompt_tokens", "Prompt tokens processed", stats["prompt_tokens_total"])
        yield CounterMetricFamily("lora:generation_tokens", "Tokens generated", stats["generation_tokens_total"])
        # vLLM's info gauge: the adapters in the batch and waiting, as comma-separated labels; the value is
        # the time of the reading (routers pick the newest sample).
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([",".join(stats["running_lora_adapters"]), ",".join(stats["waiting_lora_adapters"]),
                         str(stats["max_lora"])], time.time())
        yield info

    def render(self) -> bytes:
        return generate_latest(self.registry)
