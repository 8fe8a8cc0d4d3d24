"""Benchmark suites (``python -m llmspeed bench``) and their shared timing and reporting helpers.

Each suite is a module ``llmspeed.bench.<suite>`` with a ``run(...)`` function returning rows
(dicts with the same keys); every row names its baseline, measured in the same run.
"""

from ..timing import Timing, markdown_table, timeit

__all__ = ["Timing", "timeit", "markdown_table"]
