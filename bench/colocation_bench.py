"""What inference threads cost a training job on the same host, and what training costs inference.

Three runs of Conch's training loop on the default model (``bench/train_bench.py --only ours``, one epoch): alone,
next to an inference process decoding 8 streams continuously on the default route with 1 thread, and with 2
threads (every core of this kind of machine). Printed: training non-pad tokens/s in each case as a ratio of the
run alone, and the tokens/s the inference process kept up meanwhile. This is the measurement behind
``INFERENCE_THREADS=0`` (every core while no training runs on the host, half while one does).

    python -m bench.colocation_bench [--threads 1,2] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RATE = re.compile(r"([0-9.]+) non-pad tokens/s")


def inference_load(threads: int, report: Path) -> None:
    """Decode 8 greedy streams at a time, again and again, until SIGTERM; write the tokens/s achieved."""
    import torch

    from bench.model_prep import prepare_default_model
    from inference.engine.engine import Engine, Failed, Finished, GenerationRequest
    from inference.engine.loader import LlamaCppOptions, load_model
    from inference.engine.sampling import SamplingParams

    torch.set_num_threads(1)
    folder = prepare_default_model()
    options = LlamaCppOptions(
        cache_dir=Path(tempfile.mkdtemp(prefix="colocation-")),
        max_sequences=8,
        context_per_sequence=512,
        threads=threads,
        batch_threads=threads,
        batch_tokens=2048,
    )
    model = load_model("load", folder, backend_setting="llamacpp", quant_setting="f16", llamacpp=options)
    engine = Engine(model, max_batch_size=8).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tokens, started = 0, time.perf_counter()

    class Sink:
        def __init__(self) -> None:
            self.done = threading.Event()
            self.tokens = 0

        def put(self, event: Any) -> None:
            if isinstance(event, Finished):
                self.tokens = event.completion_tokens
            if isinstance(event, Finished | Failed):
                self.done.set()

    ids = model.encode_chat([{"role": "user", "content": "Tell me a long story about the sea."}])
    print("ready", flush=True)
    while not stop.is_set():
        sinks = [Sink() for _ in range(8)]
        for sink in sinks:
            engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=64, ignore_eos=True), sink))
        for sink in sinks:
            sink.done.wait(120)
            tokens += sink.tokens
    report.write_text(f"{tokens / (time.perf_counter() - started):.1f}")
    engine.stop()


def train(epochs: float) -> float:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--only", "ours", "--epochs", str(epochs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = RATE.search(out)
    if match is None:
        raise RuntimeError(f"no training rate in:\n{out}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="inference thread counts to try")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--load", type=int, default=None, help=argparse.SUPPRESS)  # the inference process itself
    parser.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        assert args.report is not None
        inference_load(args.load, args.report)
        return

    print(f"{os.cpu_count()} cores; training alone ...", flush=True)
    alone = train(args.epochs)
    rows: list[tuple[str, float, float | None]] = [("alone", alone, None)]
    for threads in [int(t) for t in args.threads.split(",")]:
        report = Path(tempfile.mkstemp(prefix="colocation-rate-")[1])
        load = subprocess.Popen(
            [sys.executable, "-m", "bench.colocation_bench", "--load", str(threads), "--report", str(report)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert load.stdout is not None
        load.stdout.readline()  # "ready"
        print(f"training next to inference on {threads} thread(s) ...", flush=True)
        rate = train(args.epochs)
        load.send_signal(signal.SIGTERM)
        load.wait(120)
        rows.append((f"next to inference on {threads} thread(s)", rate, float(report.read_text() or 0)))
    print("\n| training | non-pad tokens/s | vs alone | inference tokens/s meanwhile (8 streams) |")
    print("|---|---|---|---|")
    for name, rate, served in rows:
        print(f"| {name} | {rate:.1f} | {rate / alone:.2f}x | {'-' if served is None else f'{served:.1f}'} |")


if __name__ == "__main__":
    main()
