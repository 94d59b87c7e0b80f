"""No GPU figure in the docs without the word projection or a recorded run behind it.

No GPU has run this code, so every GPU number in a docs table is a projection; the day one
does, the table names the run's file (``recorded run: `path```), which must exist. A table
"names a GPU figure" when it names a GPU model and holds a figure with a unit (a rate, a time,
a size); its section (the text from the nearest heading through the table) must then say
projection/projected or cite such a run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = re.compile(r"\b(H100|H200|A100|B200|GB200)s?\b")
FIGURE = re.compile(
    r"\d\s*(%|[kMGT]?FLOP/s|tokens/s|[kMGT]?B/s|[mu]s\b|\bs\b|[kMGT]i?B\b)"
)
PROJECTION = re.compile(r"\bproject(ion|ions|ed)\b", re.IGNORECASE)
RECORDED_RUN = re.compile(r"recorded run: `([^`]+)`")


def markdown_files() -> List[Path]:
    tracked = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return tracked + sorted((ROOT / "benchmarks").glob("**/*.md")) + sorted(
        (ROOT / "examples").glob("**/*.md"))


def tables(text: str) -> Iterator[Tuple[int, str, str]]:
    """``(line number, section text up to and with the table, table)`` of every table outside
    fenced code."""
    section: List[str] = []
    table: List[str] = []
    fenced = False
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.startswith("```"):
            fenced = not fenced
        is_row = not fenced and line.lstrip().startswith("|")
        if table and not is_row:
            yield number - len(table), "\n".join(section), "\n".join(table)
            table = []
        if not fenced and line.startswith("#"):
            section = []
        section.append(line)
        if is_row:
            table.append(line)


def unbacked_gpu_tables(text: str, root: Path = ROOT) -> List[int]:
    """Line numbers of the tables that name a GPU figure with neither label nor run."""
    unbacked = []
    for line, section, table in tables(text):
        if not (GPU.search(table) and FIGURE.search(table)):
            continue
        runs = RECORDED_RUN.findall(section)
        if PROJECTION.search(section) or (runs and all((root / run).is_file() for run in runs)):
            continue
        unbacked.append(line)
    return unbacked


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_gpu_figure_is_a_projection_or_a_recorded_run(path):
    assert unbacked_gpu_tables(path.read_text(encoding="utf-8")) == [], (
        f"{path.relative_to(ROOT)}: a table names a GPU figure without the word projection "
        "or a `recorded run: `path`` that exists"
    )


def test_the_check_catches_an_unlabelled_gpu_figure(tmp_path):
    unlabelled = "## Ring speed\n\nMeasured:\n\n| GPU | rate |\n|---|---|\n| H100 | 612 TFLOP/s |\n"
    assert unbacked_gpu_tables(unlabelled, tmp_path) == [5]
    assert unbacked_gpu_tables(unlabelled.replace("Measured", "Projected"), tmp_path) == []
    cited = unlabelled.replace("Measured:", "recorded run: `runs/h100.json`")
    assert unbacked_gpu_tables(cited, tmp_path) == [5]  # the run's file does not exist
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "h100.json").write_text("{}")
    assert unbacked_gpu_tables(cited, tmp_path) == []
    fenced = "## Speed\n\n```\n| H100 | 612 TFLOP/s |\n```\n"
    assert unbacked_gpu_tables(fenced, tmp_path) == []
    cpu_only = "## Speed\n\n| layout | time |\n|---|---|\n| TP 2 | 12 ms |\n"
    assert unbacked_gpu_tables(cpu_only, tmp_path) == []
    no_figure = "## Layouts\n\n| GPU | layout |\n|---|---|\n| H100 | TP 8, PP 2 |\n"
    assert unbacked_gpu_tables(no_figure, tmp_path) == []
