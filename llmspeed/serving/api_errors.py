"""The HTTP errors of the OpenAI-compatible server: :class:`APIError` (a status and OpenAI's error body) and
:func:`invalid`, the 400 for a body pydantic refused, naming the field, the value given and what is accepted."""

from __future__ import annotations

from typing import Any

from ..names import shown as _shown


class APIError(Exception):
    """An error answered with ``status`` and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error body."""
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error"}
        kind = kinds.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_KINDS = {"str": "a string", "list[str]": "a list of strings", "list[int]": "a list of token ids (integers)",
          "list[list[int]]": "a list of lists of token ids", "list[dict[str,any]]": "a list of content parts"}


def _is_member(part: Any) -> bool:
    """Whether a pydantic error ``loc`` part names a member of a union type (``"list[int]"``), not a field."""
    return isinstance(part, str) and (part in _KINDS or "[" in part)


def invalid(errors: list[Any]) -> APIError:
    """The 400 for pydantic's ``errors``: the field's path as ``param``, the value given, what is accepted.

    A value no member of a union type (``stop: str | list[str]``) takes gives an error per member; the one
    that got deepest into the value says best what is wrong, and the members are what the field accepts.
    """
    first = errors[0]
    at = next((i for i, p in enumerate(first["loc"]) if _is_member(p)), None)
    if at is None:
        param = ".".join(str(p) for p in first["loc"])
        if first.get("type") == "missing":  # its input is the object that lacks it: the whole body, prompt and all
            return APIError(400, f"{param}: {first['msg']}", param or None)
        return APIError(400, f"{param}: {first['msg']} (got {_shown(first.get('input'))})", param or None)
    field = first["loc"][:at]
    members = [e for e in errors if e["loc"][:at] == field and len(e["loc"]) > at and _is_member(e["loc"][at])]
    worst = max(members, key=lambda e: len(e["loc"]))  # max keeps the first of equals
    param = ".".join(str(p) for p in worst["loc"] if not _is_member(p))
    kinds = [_KINDS.get(k, k) for k in dict.fromkeys(e["loc"][at] for e in members)]
    accepted = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
    name = ".".join(str(p) for p in field)
    return APIError(400, f"{param}: {worst['msg']} (got {_shown(worst.get('input'))}); {name} must be {accepted}", param)


__all__ = ["APIError", "invalid"]
