"""Continuous batching of many tasks' requests on one base model: the engine package's public names.

request (SamplingParams, Output, the request record), scheduler (queues, admission, chunked prefill),
kv_cache (the KV memory), attention (attention over it), runner (inputs, task policy, forward), compiled
(the compiled decode step), sampler, output (detokenizing, stops) and engine (the thread loop and the API).
"""
from .engine import Engine
from .kv_cache import kv_bytes_per_token
from .request import EngineDead, Output, QueueFull, SamplingParams

__all__ = ["Engine", "EngineDead", "Output", "QueueFull", "SamplingParams", "kv_bytes_per_token"]
