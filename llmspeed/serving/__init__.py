"""Serving: a long-lived engine that many threads and asyncio tasks share (:class:`Engine`).

``Engine(model).submit(prompt, SamplingParams(...)).result()`` from any thread, or
``await engine.generate(...)`` / ``async for ev in engine.stream(...)`` from asyncio.
"""

from .engine import Engine
from .handle import RequestHandle

__all__ = ["Engine", "RequestHandle"]
