"""`lora serve`: one base model and its task adapters behind the OpenAI HTTP API.

protocol.py   request bodies and OpenAI-shaped errors
serving.py    the Serving object on app.state: engine client, task registry view, prompts, adapters, metrics
routes.py     the endpoints, each a few lines handing off to Serving
app.py        create_app (middleware, error handlers, lifespan) and run (uvicorn with a graceful drain)
"""
from .app import DrainingServer, create_app, run

__all__ = ["DrainingServer", "create_app", "run"]
