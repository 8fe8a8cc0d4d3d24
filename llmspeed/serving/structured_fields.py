"""The request fields that ask for structured outputs, as OpenAI's API and vLLM's server take them, read into one
:class:`~llmspeed.generation.StructuredOutputsParams`:

* ``response_format``: OpenAI's ``{"type": "text"}`` (free text), ``{"type": "json_object"}`` (any JSON object) and
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
* ``structured_outputs``: vLLM's object (``{"json": schema}``, ``{"regex": ...}``, ``{"choice": [...]}``,
  ``{"grammar": ...}``, ``{"json_object": true}``, with ``disable_any_whitespace``);
* ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``: vLLM's earlier names, which clients still
  send;
* a chat request's ``tool_choice`` that forces tool calls: the JSON schema of the calls (:mod:`.tool_choice`).

At most one of them may be given; a bad value is a 400 naming the field it came in.
"""

from __future__ import annotations

from typing import Any

from ..generation.structured_params import StructuredOutputsParams
from ..names import shown as _shown
from .tool_choice import forced_schema

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
VLLM_KEYS = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}


class FieldError(ValueError):
    """A structured-output field the server cannot take: its message, and the request field it names."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _from_response_format(given: dict[str, Any]) -> dict[str, Any] | None:
    kind = given.get("type")
    if kind == "text" and len(given) == 1:
        return None
    if kind == "json_object" and len(given) == 1:
        return {"json_object": True}
    if kind == "json_schema" and set(given) == {"type", "json_schema"} and isinstance(given["json_schema"], dict):
        spec = given["json_schema"]
        extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if "schema" not in spec or extra:
            raise FieldError(f"response_format.json_schema must have a 'schema' (and may have 'name', 'strict' and "
                             f"'description'); got keys {sorted(spec)}", "response_format.json_schema")  # fmt: skip
        return {"json": spec["schema"]}
    raise FieldError(f"response_format must be {{'type': 'text'}}, {{'type': 'json_object'}} or {{'type': "
                     f"'json_schema', 'json_schema': {{'name': ..., 'schema': {{...}}}}}}; got {_shown(given)}",
                     "response_format")  # fmt: skip


def _from_vllm(given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - VLLM_KEYS)
    if unknown:
        raise FieldError(f"structured_outputs takes {sorted(VLLM_KEYS)}; got {unknown}, which this server does not "
                         f"implement", "structured_outputs")  # fmt: skip
    spec = {k: v for k, v in given.items() if k != "disable_any_whitespace"}
    if given.get("disable_any_whitespace") is not None:
        if not isinstance(given["disable_any_whitespace"], bool):
            raise FieldError(f"structured_outputs.disable_any_whitespace must be a boolean; got "
                             f"{_shown(given['disable_any_whitespace'])}", "structured_outputs.disable_any_whitespace")
        spec["any_whitespace"] = not given["disable_any_whitespace"]
    return spec


def structured_outputs(request: Any) -> StructuredOutputsParams | None:
    """What ``request`` (a completion or chat request) asks its output to look like (``None``: free text).

    Raises:
        FieldError: two of the fields given, an unknown shape, or a schema, expression or grammar that does not
            compile (naming the field), or the server lacks xgrammar.
    """
    given = {name: getattr(request, name) for name in ("response_format", "structured_outputs", *GUIDED)
             if getattr(request, name, None) is not None}  # fmt: skip
    if given.get("response_format") == {"type": "text"}:
        del given["response_format"]
    if getattr(request, "forces_tools", False):  # tool_choice "required" or a named function (.tool_choice)
        given["tool_choice"] = forced_schema(request.tool_specs(), request.tool_choice)
    if len(given) > 1:
        raise FieldError(f"give one way of structuring the output; got {sorted(given)}", sorted(given)[1])
    if not given:
        return None
    (name, value), = given.items()
    spec: dict[str, Any] | None
    if name == "tool_choice":
        spec = {"json": value, "any_whitespace": False}
    elif name == "response_format":
        spec = _from_response_format(value)
    elif name == "structured_outputs":
        spec = _from_vllm(value)
    else:
        spec = {GUIDED[name]: value}
    if spec is None:
        return None
    try:
        return StructuredOutputsParams(**spec)
    except ImportError as err:
        raise FieldError(f"{name}: this server cannot structure outputs ({err})", name) from None
    except (ValueError, TypeError) as err:  # the message names the structured_outputs field it read
        raise FieldError(f"{name}: {str(err).replace('`', '')}", name) from None



__all__ = ["FieldError", "structured_outputs"]
