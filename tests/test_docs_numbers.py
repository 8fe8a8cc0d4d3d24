"""Numbers quoted in the docs' prose agree with the tables they summarise.

A number in prose that comes from a table carries a reference right after it:
``1868 MiB<!-- cell: bench/lora.md | qlora-int4-g64 | peak_MiB -->``. The fields are the file
(relative to docs/, ``.`` for the page itself, optionally ``#N`` for its N-th table), the row (its first
cell, markdown stripped, or ``header=value`` filters such as ``M=1, K=4096, dtype=bf16``) and the column
header. The quoted number must equal one of the numbers in that
cell rounded to the decimals it is quoted with (``1.48x`` matches ``4,707 (1.48x)`` and ``1.4812``).
The reference is an HTML comment, so readers of the site do not see it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
CELL = re.compile(r"<!--\s*cell:\s*(?P<file>[^|#]+?)(?:#(?P<table>\d+))?\s*\|\s*(?P<row>[^|]+?)\s*\|\s*(?P<col>[^|]+?)\s*-->")
QUOTED = re.compile(r"(?P<num>-?\d[\d,]*(?:\.\d+)?)\s*(?:x|%|MiB|MB|GB|ms|s|us|tokens/s|tok/s)?[*`)]*\s*$")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _plain(text: str) -> str:
    return text.replace("**", "").replace("`", "").strip()


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables of ``text``: each a list of rows, each row ``{header: cell}`` (markdown stripped)."""
    found: list[list[str]] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
        elif block:
            found.append(block)
            block = []
    out = []
    for lines in found:
        split = [[_plain(c) for c in line.strip().strip("|").split("|")] for line in lines]
        header, body = split[0], [r for r in split[2:]]
        out.append([dict(zip(header, row)) for row in body])
    return out


def _row_matches(row: dict[str, str], spec: str) -> bool:
    """``spec`` is the row's first cell, or ``header=value`` filters joined by commas (``M=1, dtype=bf16``)."""
    filters = [part.split("=", 1) for part in spec.split(",")]
    if all(len(f) == 2 and f[0].strip() in row for f in filters):
        return all(row[k.strip()] == v.strip() for k, v in filters)
    return next(iter(row.values()), None) == spec


def check_page(page: Path) -> tuple[int, list[str]]:
    """``(references checked, problems)`` for every ``<!-- cell: ... -->`` on ``page``."""
    text = page.read_text()
    problems, count = [], 0
    for match in CELL.finditer(text):
        if text[match.start() - 1 : match.start()] == "`":  # the syntax quoted in prose, not a reference
            continue
        count += 1
        line_no = text.count("\n", 0, match.start()) + 1
        where = f"{page.relative_to(ROOT)}:{line_no}"
        quoted = QUOTED.search(_plain(text[: match.start()].rsplit("\n", 1)[-1]).replace("~", ""))
        if quoted is None:
            problems.append(f"{where}: no number right before the cell reference")
            continue
        source = page if match["file"].strip() == "." else DOCS / match["file"].strip()
        candidates = tables(source.read_text())
        if match["table"]:
            candidates = candidates[int(match["table"]) - 1 : int(match["table"])]
        rows = [r for t in candidates for r in t if _row_matches(r, match["row"]) and match["col"] in r]
        if not rows:
            problems.append(f"{where}: no row {match['row']!r} with column {match['col']!r} in {match['file']}")
            continue
        num = quoted["num"]
        decimals = len(num.split(".")[1]) if "." in num else 0
        value = float(num.replace(",", ""))
        cell = rows[0][match["col"]]
        values = [float(n.replace(",", "")) for n in NUMBER.findall(cell)]
        if not any(abs(round(v, decimals) - value) <= 10**-decimals / 2 + 1e-9 for v in values):
            problems.append(f"{where}: prose says {num}, but {match['file']} row {match['row']!r} {match['col']!r} is {cell!r}")
    return count, problems


def test_cell_references_match_their_tables():
    checked, problems = 0, []
    for page in PAGES:
        n, found = check_page(page)
        checked += n
        problems += found
    assert not problems, "\n".join(problems)
    assert checked >= 10  # the references exist: removing them all would make this test pass vacuously


@pytest.mark.parametrize(
    "prose,ok",
    [("QLoRA peaked at 1868 MiB", True), ("QLoRA peaked at 1834 MiB", False), ("ratio **0.61x**", True),
     ("ratio 0.6x", True), ("ratio 0.62x", False), ("took 4,707 us", True)],
)
def test_the_check_catches_a_contradiction(tmp_path, monkeypatch, prose, ok):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    page = tmp_path / "page.md"
    table = "| config | peak_MiB | vs |\n|---|---|---|\n| qlora | 1868 | 4,707 (0.6062x) |\n"
    column = "vs" if "x" in prose or "us" in prose else "peak_MiB"
    page.write_text(f"{table}\n{prose}<!-- cell: . | qlora | {column} -->\n")
    checked, problems = check_page(page)
    assert checked == 1 and (not problems) == ok, problems
