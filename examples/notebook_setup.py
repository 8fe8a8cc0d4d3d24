"""The first code cell of every example notebook (imports, ``QUICK``, ``show``, the machine line, ``TEXT``).

Part of the notebooks' generator: ``make_notebooks.py`` puts it in each notebook after the title.
"""

SETUP = """\
import math
import os
import platform
import time

import torch
from IPython.display import Markdown, display

import llmspeed

QUICK = os.environ.get("LLMSPEED_EXAMPLES_QUICK") == "1"  # set by the test suite: small sizes
torch.manual_seed(0)


def show(rows):
    \"\"\"A list of dicts as a markdown table (floats to 4 significant digits).\"\"\"
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    display(Markdown("\\n".join(lines)))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# the machine these outputs come from
print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
      f"llmspeed {llmspeed.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; quick={QUICK}")


# perplexity text: the evaluation half of Python's docs (a prefix in quick mode: tokenizing all of it takes seconds)
TEXT = llmspeed.eval.pydoc_text("eval")[:40_000] if QUICK else None"""
