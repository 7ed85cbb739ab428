"""The README's figures have one source each: the tables the benchmark scripts write under benchmarks/results/.
Every figure in the README's results table, and in its paragraph on the default compile, must be a figure
of the file its command writes (to the digits shown), so a rerun that changes a result and a README that was
not updated cannot both land."""

from __future__ import annotations

import re
import shlex
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FIGURE = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])")


def figures_of(path: Path) -> set[str]:
    """Every decimal in a results table and the CSV beside it (which has the columns the table leaves out), at
    every precision from its own down to one decimal, rounded half up or half even."""
    out = set()
    for source in (path, path.with_suffix(".csv")):
        if not source.exists():
            continue
        for text in FIGURE.findall(source.read_text()):
            value = Decimal(text)
            for digits in range(1, len(text.split(".")[1]) + 1):
                step = Decimal(1).scaleb(-digits)
                out.update(str(value.quantize(step, rounding=r)) for r in (ROUND_HALF_UP, ROUND_HALF_EVEN))
    return out


def results_rows() -> list[tuple[Path, str]]:
    """(results file, table row) for each row of the README's results table; a row with an empty first cell
    belongs to the command above it; "same command, `…lite2`" swaps the model's name."""
    section = README.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows, source = [], None
    for line in section.splitlines():
        if not line.startswith("| ") or set(line) <= set("|-"):
            continue
        first = line.split("|")[1].strip()
        if first and not first.startswith("model"):
            command = re.search(r"`(python benchmarks/compare\.py[^`]*)`", first)
            if command:
                args = shlex.split(command.group(1))
                out = args[args.index("--out") + 1] if "--out" in args else None
                model = args[args.index("--model") + 1] if "--model" in args else "minilm"
                source = ROOT / (f"{out}.md" if out else f"benchmarks/results/compare_{model}.md")
            else:
                same = re.search(r"same command, `…(\w+)`", first)
                assert same and source is not None, f"a results row without its command: {first}"
                stem = re.sub(r"lite\d$", same.group(1), source.stem)
                source = source.with_name(stem + ".md")
        if first.startswith("model"):
            continue
        rows.append((source, line))
    return rows


@pytest.mark.parametrize("source,row", results_rows(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_results_table_figures_are_the_benchmarks(source, row):
    assert source.exists(), f"{source} (named by the README's command) is missing"
    known = figures_of(source)
    cells = row.split("|")[3:]  # after the model and the method
    for cell in cells:
        text = re.sub(r"\([\d.]+ bits\)", "", cell)  # "(4.04 bits)" notes the all-in bits of a row; checked below
        for figure in FIGURE.findall(text):
            assert figure in known, f"README figure {figure} (row {row.strip()[:80]}…) is not in {source.name}"
    for bits in re.findall(r"\(([\d.]+) bits\)", row):
        assert bits in known, f"README's {bits} bits is not in {source.name}"


def test_default_compile_paragraph_is_the_memory_benchmark():
    """"`bayesq compile` gives cosine C to FP32 from a M MB file ... loads in R× the FP32 model's memory":
    C, M and R are the `bayesq size` row of benchmarks/results/memory_minilm.md (`python benchmarks/memory.py`)."""
    paragraph = re.search(r"On MiniLM at 4\.0\s+bits, `bayesq compile` gives(.*?)\n\n", README, re.S).group(1)
    known = figures_of(ROOT / "benchmarks/results/memory_minilm.md")
    for figure in FIGURE.findall(paragraph.split("Times and other budgets")[0]):
        if figure in ("4.0", "1.5"):  # the budget; not a measured figure
            continue
        assert figure in known, f"README's default-compile figure {figure} is not in memory_minilm.md"
