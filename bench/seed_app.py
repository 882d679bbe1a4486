"""The seed-style service, kept only as the benchmark's baseline: it reproduces how the original app served.

One fp32 model loaded at import, a blocking ``model.generate(max_length=512)`` inside an ``async`` handler (so the
event loop stalls and requests run one after another), no chat template, and the prompt echoed into the answer.

    SEED_MODEL_DIR=var/bench/SmolLM2-135M-Instruct uvicorn bench.seed_app:app --port 8002
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = Path(
    os.environ.get("SEED_MODEL_DIR", Path(__file__).resolve().parents[1] / "var/bench/SmolLM2-135M-Instruct")
)

tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype="float32")

app = FastAPI(title="seed-style baseline")


@app.get("/generate")
async def generate(prompt: str) -> dict[str, str]:
    inputs = tokenizer(prompt, return_tensors="pt")
    outputs = model.generate(**inputs, max_length=512)
    return {"generate_text": tokenizer.decode(outputs[0], skip_special_tokens=True)}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
