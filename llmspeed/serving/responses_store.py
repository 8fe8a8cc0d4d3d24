"""Stored responses of the Responses API (``store``, ``previous_response_id``, ``GET`` and ``DELETE
/v1/responses/{id}``), for a server started with ``responses_store=True`` (``--enable-responses-store``, or vLLM's
``VLLM_ENABLE_RESPONSES_API_STORE=1``).

Each stored response keeps its whole conversation as Responses input items: the items of the response it continued
(``previous_response_id``), its own input, then its output items (messages, function calls, reasoning), which are
valid input items as they are. A request naming it runs that conversation followed by its own input, as OpenAI's
API does (``instructions`` are not carried over). In memory, the most recent :data:`CAPACITY` responses; a server
restart forgets them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .api_errors import APIError
from .responses_request import ResponsesRequest

CAPACITY = 1024  # responses kept; the least recently used goes first


class ResponseStore:
    """The responses a server keeps, by id (used from the server's event loop only)."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep ``response`` and the conversation it ends (its output items included)."""
        self._kept[response["id"]] = (response, conversation)
        self._kept.move_to_end(response["id"])
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def _entry(self, rid: str, param: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        entry = self._kept.get(rid)
        if entry is None:
            raise APIError(404, f"response {rid!r} is not stored here (this server keeps the last {self.capacity}, in "
                                f"memory, of those sent with store left on)", param, "response_not_found")  # fmt: skip
        self._kept.move_to_end(rid)
        return entry

    def get(self, rid: str) -> dict[str, Any]:
        """``GET /v1/responses/{rid}``: the stored response object (404 when it is not stored)."""
        return self._entry(rid, None)[0]

    def delete(self, rid: str) -> dict[str, Any]:
        """``DELETE /v1/responses/{rid}``: forget it (404 when it is not stored)."""
        self._entry(rid, None)
        del self._kept[rid]
        return {"id": rid, "object": "response", "deleted": True}

    def attach(self, req: ResponsesRequest) -> None:
        """Give ``req`` the conversation of its ``previous_response_id`` (a 404 naming it when that is not stored) and,
        unless it says ``store: false`` (OpenAI's default is to store), the callback that keeps its response."""
        if req.previous_response_id is not None:
            req.continues(self._entry(req.previous_response_id, "previous_response_id")[1])
        if req.store is not False:
            conversation = req.conversation_items()
            req.keeping(lambda response: self.put(response, [*conversation, *response["output"]]))


__all__ = ["CAPACITY", "ResponseStore"]
