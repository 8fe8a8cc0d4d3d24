"""Write the example notebooks (``examples/*.ipynb``) from the cells in ``notebook_*.py``: ``python examples/make_notebooks.py``.

The notebooks are generated, not edited by hand, so they stay reviewable as Python: their cells are in
``notebook_setup.py`` (the first code cell of each), ``notebook_cells_models.py`` (precision, quantization,
QLoRA), ``notebook_cells_batching.py`` (continuous batching, all together) and ``notebook_cells_serving.py`` (the engine
and the OpenAI-compatible server); this file writes and runs them. They use only
llmspeed's public API (plus torch, transformers and matplotlib). Each reads ``LLMSPEED_EXAMPLES_QUICK``
(set by ``tests/test_notebooks.py``, and by ``tests/test_docs_examples.py`` for the docs' code blocks):
when it is ``1`` the sizes shrink so that all notebooks run in a few minutes on 2 CPU cores; the
default sizes give the numbers worth reading.

``python examples/make_notebooks.py --execute`` also runs each notebook at its default sizes and writes
it with its outputs (the committed notebooks are executed; their first cell prints the machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).parent
if str(HERE.resolve()) not in sys.path:  # the cell modules beside this file, also when it is loaded by path (tests)
    sys.path.insert(0, str(HERE.resolve()))

from notebook_cells_batching import ALL_TOGETHER, BATCHING  # noqa: E402
from notebook_cells_models import PRECISION, QLORA, QUANTIZATION  # noqa: E402
from notebook_cells_serving import SERVING  # noqa: E402
from notebook_setup import SETUP  # noqa: E402, F401  (the shared first code cell, kept reachable here)

NOTEBOOKS = {
    "01_precision.ipynb": PRECISION,
    "02_quantization.ipynb": QUANTIZATION,
    "03_qlora.ipynb": QLORA,
    "04_continuous_batching.ipynb": BATCHING,
    "05_all_together.ipynb": ALL_TOGETHER,
    "06_serving.ipynb": SERVING,
}


def build(folder: Path = HERE, names: list[str] | None = None) -> list[Path]:
    """Write every notebook (or those in ``names``) into ``folder``; return the paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{Path(name).stem}-{i}"
        path = folder / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def execute(path: Path, timeout: int = 3600) -> None:
    """Run the notebook at ``path`` at its default sizes and write it back with its outputs."""
    import nbclient

    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> None:
    """Write the notebooks; with ``--execute``, also run them and keep their outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run each notebook and write its outputs")
    parser.add_argument("names", nargs="*", help="only these notebooks (default: all)")
    args = parser.parse_args(argv)
    names = [n if n.endswith(".ipynb") else f"{n}.ipynb" for n in args.names]  # "04_continuous_batching" too
    unknown = [n for n in args.names if (n if n.endswith(".ipynb") else f"{n}.ipynb") not in NOTEBOOKS]
    if unknown:  # it wrote nothing and said nothing
        parser.error(f"no notebook named {unknown}; the notebooks are {list(NOTEBOOKS)}")
    for path in build(HERE, names):
        if args.execute:
            execute(path)
        print(path)


if __name__ == "__main__":
    main()
