"""The served models as clients see them: /v1/models, name -> task, adapters loaded and unloaded at run time.

The one list of tasks is the MultiTaskModel's registry (`mt.downstreams`); this object is its view under
the served names, plus the rules for run-time adapters (vLLM's /v1/load_lora_adapter and unload): names,
the --adapter-root they must lie in, and error messages that name files relative to it, never by their
absolute local path (the server log keeps the full message).
"""
import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.responses import PlainTextResponse

from ..engine import EngineDead
from ..errors import LoraError
from ..files import OutsideRootError
from ..registry import CheckedAdapter
from .protocol import APIError, LoadAdapterRequest, UnloadAdapterRequest

log = logging.getLogger("lora.serve")
LORA_NAME = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
ABSOLUTE_PATH = re.compile(r"(?<![\w.~])(/[^\s'\"/]+)+/([^\s'\"/]*)")


class ServedModels:
    """The base model (by its served name) and the tasks of `mt`, for the routes.

    Args:
        mt: the MultiTaskModel; its registry is the one list of tasks.
        engine: the Engine that owns `mt`; registry changes run on its thread, between steps.
        name: the base model's id in /v1/models and in errors; no task may be named so.
        adapter_root: the folder /v1/load_lora_adapter may read from (None: loading at run time is off).
    """

    def __init__(self, mt: Any, engine: Any, name: str, adapter_root: str | None = None) -> None:
        if name in mt.downstreams:
            raise LoraError(f"task {name!r} has the served model's name, so requests to it would reach the base "
                            "model; rename the task in the mapper or pick another --served-model-name")
        self.mt, self.engine, self.name = mt, engine, name
        self.adapter_root = None if adapter_root is None else os.path.abspath(adapter_root)
        self.created = int(time.time())
        self.on_unload: list[Callable[[str], None]] = []  # e.g. the metrics dropping the task's labels
        model_path = str(getattr(mt.pretrained_model.config, "_name_or_path", "") or "")
        # Longest first, so a root inside the model folder (or the reverse) is replaced by its own name.
        paths = {os.path.abspath(model_path): name, os.path.realpath(model_path): name} if model_path else {}
        if self.adapter_root is not None:
            paths.update({os.path.realpath(self.adapter_root): "--adapter-root", self.adapter_root: "--adapter-root"})
        self.paths = sorted(paths.items(), key=lambda kv: -len(kv[0]))

    # ------------------------------------------------------------ names

    def task_of(self, model: str, param: str = "model") -> str | None:
        """None for the base model, else the task; an unknown name is a 404, as OpenAI answers it."""
        if model == self.name:
            return None
        if model not in self.mt.downstreams:
            shown = model if len(model) <= 200 else model[:200] + "..."
            raise APIError(404, f"The model `{shown}` does not exist. Models here: {', '.join(self.ids())}",
                           param=param, code="model_not_found")
        return model

    def ids(self) -> list[str]:
        return [self.name, *sorted(self.mt.downstreams)]

    def card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "lora-pytorch",
                "root": self.name, "parent": None if name == self.name else self.name}

    def list(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.card(name) for name in self.ids()]}

    def get(self, name: str) -> dict[str, Any]:
        self.task_of(name)
        return self.card(name)

    def public(self, message: str) -> str:
        """`message` as a client may see it: files relative to --adapter-root, the model by its served name,
        any other absolute path by its last component."""
        for path, shown in self.paths:
            message = message.replace(path + os.sep, "" if shown == "--adapter-root" else shown + os.sep)
            message = message.replace(path, shown)
        return ABSOLUTE_PATH.sub(lambda m: f".../{m.group(2)}", message)

    def error(self, status: int, error: BaseException, **fields: Any) -> APIError:
        """An APIError for a LoraError: the message without local paths; the log keeps the full one."""
        log.warning("%s: %s", type(error).__name__, error)
        return APIError(status, self.public(str(error)), **fields)

    # ------------------------------------------------------------ adapters at run time (vLLM's endpoints)

    def check_name(self, name: str) -> None:
        if not LORA_NAME.fullmatch(name):
            raise APIError(400, "lora_name must be 1 to 128 characters of A-Z a-z 0-9 . _ : / -", param="lora_name",
                           code="invalid_lora_name")
        if name == self.name:
            raise APIError(400, f"`{name}` is the base model's name", param="lora_name")

    def path_in_root(self, path: str) -> str:
        """`path` (a relative one starts at the root) if it names something inside the adapter root, on paper;
        links are checked where it matters, as each file is opened (read_adapter with root)."""
        if self.adapter_root is None:
            raise APIError(403, "loading adapters at run time is off; start the server with --adapter-root",
                           param="lora_path", code="adapter_loading_disabled", type="permission_error")
        if "\0" in path:
            raise APIError(400, "lora_path holds a NUL byte", param="lora_path")
        full = os.path.normpath(os.path.join(self.adapter_root, path))  # an absolute `path` replaces the root here
        if os.path.commonpath([self.adapter_root, full]) != self.adapter_root:
            raise APIError(403, f"lora_path {self.public(path)} is not inside --adapter-root; give a path relative "
                           "to it", param="lora_path", code="path_not_allowed", type="permission_error")
        return full

    async def load(self, body: LoadAdapterRequest, off_loop: Callable[..., Awaitable[Any]]) -> PlainTextResponse:
        """Check the adapter in a worker thread (a bad or slow checkpoint never holds up the engine's steps),
        then register it between two steps; `off_loop(fn, *args)` runs fn in a worker thread."""
        name = body.lora_name
        self.check_name(name)
        path = self.path_in_root(body.lora_path)
        if name in self.mt.downstreams:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")

        def register(checked: CheckedAdapter) -> None:  # on the engine thread, between two steps
            if name in self.mt.downstreams:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            # The adapter checked in the worker thread is the one registered. With root, a re-read after cache
            # eviction opens each file below the root without following links: what is checked is what is read.
            self.mt.add_downstream(name, path, root=self.adapter_root, checked=checked)
        try:
            checked = await off_loop(self.mt.check_adapter, path, self.adapter_root)
            await asyncio.wrap_future(self.engine.call(lambda: register(checked)))
        except EngineDead as e:
            raise self.error(503, e, type="server_error", code="engine_dead") from None
        except OutsideRootError as e:
            raise self.error(403, e, param="lora_path", code="path_not_allowed", type="permission_error") from None
        except LoraError as e:
            raise self.error(400, e, param="lora_path", code="invalid_adapter") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, body: UnloadAdapterRequest) -> PlainTextResponse:
        name = body.lora_name
        self.check_name(name)

        def unregister() -> None:
            if name not in self.mt.downstreams:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                               code="model_not_found")
            self.mt.remove_downstream(name)
        try:
            await asyncio.wrap_future(self.engine.call(unregister))
        except EngineDead as e:
            raise self.error(503, e, type="server_error", code="engine_dead") from None
        for forget in self.on_unload:
            forget(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
