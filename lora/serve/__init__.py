"""`lora serve`: one base model and its task adapters behind the OpenAI HTTP API (vLLM's layout).

protocol.py       request bodies (JSON types only) and OpenAI-shaped errors
limits.py         the request limits, in one place
models.py         the served models: /v1/models, name -> task, adapters loaded and unloaded at run time
engine_client.py  one HTTP request's engine requests and their Outputs on the event loop
metrics.py        Prometheus metrics (lora:* and vllm:*)
serving.py        what the generating endpoints share: tokenizing off the loop, jobs, server-sent events
completions.py, chat.py, generate.py   the endpoints' work
routes.py         the endpoints, each a few lines
gate.py           middleware: drain, API key, body size and deadline
app.py            create_app, and run (uvicorn with a bounded graceful drain)
"""
from .app import DrainingServer, create_app, run

__all__ = ["DrainingServer", "create_app", "run"]
