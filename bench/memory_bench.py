"""The pre-flight memory estimate against what a training step really keeps, with and without gradient checkpointing.

On the default model (SmolLM2-135M-Instruct, prepared in the model store), LoRA r=8 on all linear layers, one
forward and backward pass of the worker's loss on a batch of random token ids, every position trained (the
estimate's worst case). Measured: the bytes of the tensors autograd saves during the forward pass for the backward
pass (each storage counted once, parameters excluded; with checkpointing, one layer's recomputation during the
backward pass is not in it), and the step's wall time; printed next to ``core.memory_estimate``'s activations.

    python bench/memory_bench.py [--batch 4] [--cutoff 256] [--compute-type fp32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.contracts import Hyperparameters  # noqa: E402
from core.memory_estimate import ModelShape, estimate_memory  # noqa: E402
from core.settings import get_settings  # noqa: E402
from worker.pipeline.data import Example, pad_batch  # noqa: E402
from worker.pipeline.device import resolve_compute  # noqa: E402
from worker.pipeline.prepare import prepare_base_model  # noqa: E402
from worker.pipeline.train import LossFunction, attach_lora, load_base_model  # noqa: E402


def saved_bytes(loss_fn: LossFunction, batch: Any, parameters: set[int]) -> tuple[int, float]:
    """Bytes autograd saved for backward during one forward (each storage once), and the step's seconds."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in parameters and key not in seen:
            seen[key] = storage.nbytes()
        return tensor

    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(batch)
    loss.backward()
    return sum(seen.values()), time.perf_counter() - started


def run(checkpointing: bool, args: argparse.Namespace, base: Path, batch: Any) -> dict[str, float]:
    compute = resolve_compute(args.compute_type)
    hp = Hyperparameters(lora_rank=8, cutoff_len=args.cutoff, per_device_train_batch_size=args.batch)
    model = attach_lora(load_base_model(base, compute, gradient_checkpointing=checkpointing), hp, 0)
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss_fn = LossFunction(model, compute)
    saved_bytes(loss_fn, batch, parameters)  # warm-up
    figures = [saved_bytes(loss_fn, batch, parameters) for _ in range(args.repeat)]
    shape = ModelShape.from_config(json.loads((base / "config.json").read_text()))
    assert shape is not None
    estimate = estimate_memory(
        shape,
        lora_rank=8,
        lora_target="all",
        batch_size=args.batch,
        cutoff_len=args.cutoff,
        precision=compute.precision,
        gradient_checkpointing=checkpointing,
    )
    return {
        "saved_bytes": figures[-1][0],
        "seconds": statistics.median(f[1] for f in figures),
        "estimate_bytes": estimate.activations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--compute-type", default="fp32")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = prepare_base_model("SmolLM2-135M-Instruct", get_settings(), progress=False)
    ids = torch.randint(0, 49152, (args.batch, args.cutoff)).tolist()
    batch = pad_batch([Example(input_ids=row, labels=row) for row in ids], 0)
    plain = run(False, args, base, batch)
    checkpointed = run(True, args, base, batch)
    print(f"batch {args.batch} x cutoff_len {args.cutoff}, {args.compute_type}, LoRA r=8 on all linear layers")
    for name, r in (("plain", plain), ("gradient_checkpointing", checkpointed)):
        measured, estimated = r["saved_bytes"] / 2**20, r["estimate_bytes"] / 2**20
        print(
            f"{name:>22}: saved for backward {measured:.0f} MiB, estimate {estimated:.0f} MiB "
            f"(measured/estimate {measured / estimated:.2f}), step {r['seconds']:.2f} s"
        )
    print(
        f"checkpointing/plain: saved bytes {checkpointed['saved_bytes'] / plain['saved_bytes']:.2f}, "
        f"estimate {checkpointed['estimate_bytes'] / plain['estimate_bytes']:.2f}, "
        f"step time {checkpointed['seconds'] / plain['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
