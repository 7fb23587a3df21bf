"""The README's reproduction table quotes the committed results: each number in it is the ACC
of that method in the ``summary.md`` of the results folder the row reports."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
RESULTS = ROOT / "benchmarks" / "results"

#: The README row (by the start of its first cell) -> the results folder it quotes.
ROWS = {
    "permuted MNIST, 20 tasks": "permuted_mnist_all",
    "the same with PyTorch's default initialisation": "permuted_mnist_torch_init",
    "rotated MNIST, 20 tasks": "rotated_mnist_all",
    "split CIFAR-10, 5 tasks": "split_cifar10_all",
    "MNIST → Fashion-MNIST → CIFAR-10": "multi_dataset_all",
}
#: Baselines without a memory of earlier data, as the README's column names them.
NO_MEMORY = {"OWM": "owm", "GPM": "gpm", "EWC": "ewc", "online EWC": "online-ewc"}
_MEAN_STD = r"(\d+\.\d\d) ± (\d+\.\d\d)"


def _summary_acc(folder: str) -> dict[str, str]:
    """method -> its ``ACC %`` cell (``"91.03 ± 0.16"``) in the folder's summary.md."""
    lines = (RESULTS / folder / "summary.md").read_text().splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| method"))
    cols = [c.strip() for c in lines[head].strip("|").split("|")]
    acc = cols.index("ACC %")
    out = {}
    for ln in lines[head + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = cells[acc]
    return out


def _readme_rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| benchmark | RGO |"))
    assert [c.strip() for c in lines[head].strip("|").split("|")] == [
        "benchmark",
        "RGO",
        "strongest baseline without memory",
        "SGD fine-tuning",
        "fresh network per task",
    ]
    rows = {}
    for ln in lines[head + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _first(cell: str) -> str:
    m = re.search(_MEAN_STD, cell)
    return f"{m.group(1)} ± {m.group(2)}" if m else f"(no mean ± std in {cell!r})"


def _mean(cell: str) -> float:
    return float(cell.split("±")[0])


def _disagreements(readme: str) -> list[str]:
    """Every number of the README's reproduction table that its summary.md does not say."""
    rows = _readme_rows(readme)
    bad = [] if len(rows) == len(ROWS) else [f"{len(rows)} rows, expected {len(ROWS)}"]
    for label, cells in rows.items():
        folder = next(f for start, f in ROWS.items() if label.startswith(start))
        acc = _summary_acc(folder)
        rgo, baseline, sgd, stl = cells
        for method, cell in (("rgo", rgo), ("sgd", sgd), ("stl", stl)):
            if _first(cell) != acc[method]:
                bad.append(f"{folder} {method}: README {_first(cell)}, summary {acc[method]}")
        named = re.findall(r"(online EWC|OWM|GPM|EWC) " + _MEAN_STD, baseline)
        if not named:
            bad.append(f"{folder}: no baseline in {baseline!r}")
            continue
        for name, mean, std in named:
            if f"{mean} ± {std}" != acc[NO_MEMORY[name]]:
                bad.append(
                    f"{folder} {name}: README {mean} ± {std}, summary {acc[NO_MEMORY[name]]}"
                )
        # The first one named is the strongest of those the folder measured.
        best = max((m for m in NO_MEMORY.values() if m in acc), key=lambda m: _mean(acc[m]))
        if NO_MEMORY[named[0][0]] != best:
            bad.append(f"{folder}: strongest baseline is {best}, README names {named[0][0]}")
    return bad


def test_readme_reproduction_table_matches_the_committed_summaries():
    assert _disagreements((ROOT / "README.md").read_text()) == []


def test_a_changed_number_or_order_in_the_table_is_caught():
    readme = (ROOT / "README.md").read_text()
    rows = _readme_rows(readme)
    label, cells = next(iter(rows.items()))
    rgo = _first(cells[0])
    changed = readme.replace(rgo, f"{_mean(rgo) + 0.01:.2f} ± {rgo.split('± ')[1]}", 1)
    assert any(" rgo: README" in d for d in _disagreements(changed))
    swapped = readme.replace("| OWM 88.62", "| GPM 84.70 ± 0.44; OWM 88.62", 1)
    assert any("strongest baseline is owm" in d for d in _disagreements(swapped))
