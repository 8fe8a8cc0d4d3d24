"""``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``: vLLM's runtime LoRA updating, for a server
started with ``allow_runtime_lora=True`` (``--allow-runtime-lora-updating``, or vLLM's
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``).

A loaded adapter is served under its name at once (``/v1/models`` lists it; a request naming it runs it, batched
with every other adapter's); the requests already running are untouched: the adapter that was active (none, on a
server with adapters) is set back before the next step, under the model's step lock, so a request for the base model
never meets the new adapter. Unloading takes the name out of service first, then deletes the adapter: a request
still running it ends with an error naming it (the ``lora`` verbs' rule), never with another adapter's tokens.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from .. import lora
from ..protocol import step_lock
from .api_errors import APIError
from .openai_protocol import parse

if TYPE_CHECKING:
    from .server import OpenAIServer


class LoadLoRARequest(BaseModel):
    """``POST /v1/load_lora_adapter``: serve the adapter folder ``lora_path`` (ours or PEFT's) as ``lora_name``;
    ``load_inplace`` replaces an adapter already served under that name (vLLM's field)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRARequest(BaseModel):
    """``POST /v1/unload_lora_adapter``: stop serving adapter ``lora_name`` and delete it from the model."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names are what identify adapters here


def _load(model: Any, path: Path, name: str, replace: bool) -> None:
    """Load adapter ``name`` from ``path`` (replacing the one of that name when ``replace``), leaving the active
    adapter as it was: one step-lock hold, so no step runs between the load and the reset. A replacement is first
    loaded under a scratch name, so a folder that cannot load leaves the adapter it would replace as it was."""
    with step_lock(model.module):
        active = lora.active_adapter(model)
        try:
            if replace:
                scratch = f"llmspeed-check-{uuid.uuid4().hex}"
                lora.load_adapter(model, path, scratch)  # all or nothing: raises with the model untouched
                lora.delete_adapter(model, scratch)
                lora.delete_adapter(model, name)
            lora.load_adapter(model, path, name)
        finally:
            lora.set_adapter(model, active if active in lora.adapter_names(model) else None)


async def load(server: OpenAIServer, payload: Any) -> str:
    """Serve a new adapter; vLLM's plain-text success line. 400 for a name taken (by the base model, or by a served
    adapter without ``load_inplace``), a path that is no adapter folder, or an adapter that does not fit the model."""
    req = parse(LoadLoRARequest, payload)
    name = req.lora_name
    if not name.strip() or name == server.model_name:
        raise APIError(400, f"lora_name must be a non-empty name other than the base model's ({server.model_name!r}); "
                            f"got {name!r}", "lora_name")  # fmt: skip
    path = Path(req.lora_path)
    if not path.is_dir():
        raise APIError(400, f"lora_path must be an adapter folder on the server; got {req.lora_path!r}, which is not "
                            f"a folder", "lora_path")  # fmt: skip
    async with server.adapter_updates:
        served = name in server.adapters
        if served and not req.load_inplace:
            raise APIError(400, f"adapter {name!r} is already served; unload it first, or send load_inplace: true",
                           "lora_name")
        try:
            await asyncio.to_thread(_load, server.engine.model, path, name, served)
        except (ValueError, FileNotFoundError, KeyError, OSError) as err:
            raise APIError(400, f"adapter {name!r} from {req.lora_path!r} cannot be loaded: {err}", "lora_path") from None
        if not served:
            server.adapters = (*server.adapters, name)
    return f"Success: LoRA adapter '{name}' added successfully."


async def unload(server: OpenAIServer, payload: Any) -> str:
    """Stop serving an adapter and delete it; 404 for a name not served (as vLLM)."""
    req = parse(UnloadLoRARequest, payload)
    name = req.lora_name
    async with server.adapter_updates:
        if name not in server.adapters:
            raise APIError(404, f"the LoRA adapter {name!r} is not served; this server has {list(server.adapters)}",
                           "lora_name", "model_not_found")  # fmt: skip
        server.adapters = tuple(a for a in server.adapters if a != name)  # new requests for it: 404 from now on
        try:
            await asyncio.to_thread(lora.delete_adapter, server.engine.model, name)
        except ValueError as err:  # merged into the base: it cannot be taken out
            server.adapters = (*server.adapters, name)
            raise APIError(400, f"adapter {name!r} cannot be unloaded: {err}", "lora_name") from None
    return f"Success: LoRA adapter '{name}' removed successfully."


__all__ = ["LoadLoRARequest", "UnloadLoRARequest", "load", "unload"]
