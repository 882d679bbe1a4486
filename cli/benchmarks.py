"""``conch bench``: run the benchmark scripts in bench/ and print one goals table from the figures they write.

The scripts print their own detailed tables; this module only reads their JSON and lines the goals up: the
baseline, Conch's figure, the ratio and the target, with the medians the scripts computed over repeated runs."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def _run(console: Console, argv: list[str]) -> bool:
    console.rule(" ".join(argv[1:]))
    return subprocess.run(argv, cwd=ROOT, check=False).returncode == 0


def training_goals(runs: list[dict[str, Any]]) -> list[list[str]]:
    def median(which: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["which"] == which and r.get(key) is not None]
        return statistics.median(values) if values else None

    ours, base = median("ours", "tokens_per_second"), median("baseline", "tokens_per_second")
    loss_ours, loss_base = median("ours", "final_loss"), median("baseline", "final_loss")
    learned_ours, learned_base = median("ours", "persona_seconds"), median("baseline", "persona_seconds")
    rows = []
    if ours and base:
        rows.append(
            ["training non-pad tokens/s", f"Trainer+peft {base:.0f}", f"{ours:.0f}", f"{ours / base:.2f}x", ">= 1.5x"]
        )
    if loss_ours is not None and loss_base is not None:
        rows.append(["training final loss", f"{loss_base:.3f}", f"{loss_ours:.3f}", "-", "no worse"])
    rows.append(
        [
            "persona learned after (s of training)",
            f"{learned_base:.0f} s" if learned_base else "not learned",
            f"{learned_ours:.0f} s" if learned_ours else "not learned",
            f"{learned_base / learned_ours:.1f}x" if learned_ours and learned_base else "-",
            "<= 60 s",
        ]
    )
    return rows


def run_benchmarks(console: Console, *, quick: bool = False) -> int:
    folder = Path(tempfile.mkdtemp(prefix="conch-bench-"))
    inference_json, training_json = folder / "inference.json", folder / "training.json"
    inference = [sys.executable, "-m", "bench.inference_bench", "--json", str(inference_json)]
    training = [sys.executable, "bench/train_bench.py", "--json", str(training_json)]
    training += ["--repeat", "1"] if quick else ["--repeat", "2"]
    inference += ["--quick", "--repeats", "1"] if quick else []
    ok = _run(console, inference)
    ok = _run(console, training) and ok

    table = Table(title="Conch goals (medians; every baseline measured in the same run on this machine)")
    for column in ("goal", "baseline", "Conch", "ratio", "target"):
        table.add_column(column)
    if inference_json.exists():
        for row in json.loads(inference_json.read_text())["goals"]:
            table.add_row(*row)
    if training_json.exists():
        for row in training_goals(json.loads(training_json.read_text())):
            table.add_row(*row)
    # Pipes and logs default to 80 columns, which folds every row of this table.
    (console if console.width >= 120 else Console(width=120)).print(table)
    return 0 if ok else 1
