"""Distributed training on one host: Conch's LoRA loop on 2 processes (accelerate DDP; gloo on CPU, nccl on GPUs)
against 1 process, same examples, same effective batch (1 process x batch B vs 2 processes x B/2), same seed.

Both runs go through accelerate's launcher the way the worker launches a num_devices > 1 job (the 1-process run
as a plain process), each process with the host's cores divided among the processes. Printed: non-pad tokens/s
of training for each, their ratio, and the per-step and final training loss of each with the largest relative
difference.

    python bench/ddp_bench.py [--model SmolLM2-135M-Instruct] [--data data/persona.jsonl] [--examples 32]
                              [--batch 4] [--epochs 1] [--compute-type auto] [--repeat 1]
                              [--baseline-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402


def train_here(args: argparse.Namespace) -> None:
    """One process of a run (or the whole 1-process run): train and write the figures (rank 0)."""
    import torch

    from core.contracts import Hyperparameters
    from core.datasets import load_conversations
    from core.settings import get_settings
    from worker.pipeline.data import prepare_data
    from worker.pipeline.device import resolve_compute
    from worker.pipeline.prepare import prepare_base_model
    from worker.pipeline.train import LoraTrainer, SilentHooks, attach_lora, load_base_model

    class Recorder(SilentHooks):  # here: torch is imported only once the process's threads are set
        def __init__(self) -> None:
            self.logs: list[dict[str, Any]] = []

        def on_log(self, metrics: dict[str, Any]) -> None:
            self.logs.append(metrics)

    distribution = None
    device = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        from worker.pipeline.distributed import Distribution

        distribution = Distribution(Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no"))
        device = distribution.device
    world = distribution.world_size if distribution else 1
    settings = get_settings()
    base = prepare_base_model(args.model, settings)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    conversations = load_conversations(args.data, "alpaca")[: args.examples]
    hp = Hyperparameters(
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch // world,
        save_steps=0,
        compute_type=args.compute_type,
    )
    compute = resolve_compute(hp.compute_type, device)
    data = prepare_data(tokenizer, conversations, None, hp, args.seed)
    torch.manual_seed(args.seed)
    model = attach_lora(load_base_model(base, compute), hp, args.seed)
    hooks = Recorder()
    with tempfile.TemporaryDirectory() as root:
        trainer = LoraTrainer(
            model,
            data.train,
            [],
            hp,
            seed=args.seed,
            compute=compute,
            pad_id=int(tokenizer.pad_token_id),
            checkpoint_root=Path(root) / "checkpoints",
            hooks=hooks,
            distribution=distribution,
        )
        started = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - started
    if distribution is None or distribution.is_main:
        figures = {
            "processes": world,
            "threads": torch.get_num_threads(),
            "steps": result.steps,
            "tokens": result.trained_tokens,
            "seconds": seconds,
            "tokens_per_second": result.metrics.get("tokens_per_second"),
            "losses": [m["loss"] for m in hooks.logs],
            "train_loss": result.metrics.get("train_loss"),
            "compute": compute.describe(),
        }
        args.out.write_text(json.dumps(figures))


def launch(args: argparse.Namespace, processes: int, out: Path) -> dict[str, Any]:
    from core.settings import get_settings
    from worker.launch import launcher_argv, rank_environment

    script = [str(Path(__file__).resolve()), "--rank-run", "--out", str(out), *passthrough(args)]
    launcher = launcher_argv(processes, get_settings()) if processes > 1 else [sys.executable]
    argv = [*launcher, *script]
    env = rank_environment(processes)
    if processes == 1 and args.baseline_threads:
        env["OMP_NUM_THREADS"] = str(args.baseline_threads)
    subprocess.run(argv, env=env, check=True, cwd=ROOT)
    return dict(json.loads(out.read_text()))


def passthrough(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--data",
        str(args.data),
        "--examples",
        str(args.examples),
        "--batch",
        str(args.batch),
        "--epochs",
        str(args.epochs),
        "--compute-type",
        args.compute_type,
        "--seed",
        str(args.seed),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "persona.jsonl")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="effective batch: per process x processes")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--compute-type", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs, order alternating")
    parser.add_argument(
        "--baseline-threads", type=int, default=0, help="threads of the 1-process run (default: all cores)"
    )
    parser.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        train_here(args)
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    host = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"host: {host}; model {args.model}; {args.examples} examples, effective batch {args.batch}")
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        # Other work on a small machine skews one pair of runs: repeats alternate the order; medians are compared.
        for repeat in range(args.repeat):
            for processes in (1, 2) if repeat % 2 == 0 else (2, 1):
                load = os.getloadavg()[0]
                run = launch(args, processes, Path(folder) / f"{processes}-{repeat}.json")
                runs[processes].append(run)
                print(
                    f"{run['processes']} process(es) x {run['threads']} threads, {run['compute']}: {run['steps']} "
                    f"steps, {run['tokens']} tokens in {run['seconds']:.1f} s = {run['tokens_per_second']:.1f} "
                    f"non-pad tokens/s; train loss {run['train_loss']:.6f} [load average {load:.2f} -> "
                    f"{os.getloadavg()[0]:.2f}]"
                )
    one, two = runs[1][0], runs[2][0]
    deltas = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["losses"], two["losses"], strict=True)]
    rate = {n: statistics.median(r["tokens_per_second"] for r in runs[n]) for n in runs}
    print(
        f"ratio 2 processes / 1 process: {rate[2] / rate[1]:.2f}x tokens/s ({rate[2]:.1f} vs {rate[1]:.1f}, median "
        f"of {args.repeat}); per-step loss: largest relative difference {max(deltas):.2e} over {len(deltas)} steps; "
        f"final train loss {one['train_loss']:.6f} vs {two['train_loss']:.6f}"
    )


if __name__ == "__main__":
    main()
