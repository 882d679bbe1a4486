"""Merge the trained adapter into the base model and write a folder a server can load as-is.

The merge happens on a fresh copy of the base model loaded in the dtype it is stored in, so the merged weights
keep the base's precision whatever precision training computed in. Next to the weights go the tokenizer with
its chat template, a generation config whose EOS and pad tokens are right for the template, the adapter itself,
and ``conch.json``, which names the template the model was trained with (serving must render prompts with it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.templates import stop_strings
from worker.pipeline.checkpoints import ADAPTER_FILE

ADAPTER_SUBDIR = "adapter"
MANIFEST = "conch.json"


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """EOS first, then every template stop string that is a single token of this vocabulary."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for text in stop_strings(template, tokenizer):
        token_id = vocab.get(text)
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


@dataclass
class Merged:
    """The merged model as written, still in memory (its serving files are made from it)."""

    model: Any
    tokenizer: Any
    stop_ids: list[int]


def merge_adapter(
    base_path: Path,
    adapter_dir: Path,
    out: Path,
    *,
    template: str,
    manifest: dict[str, Any],
) -> Merged:
    """Write the merged model into ``out`` (an empty folder; the caller publishes it atomically)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype="auto", use_safetensors=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()

    stops = stop_token_ids(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    try:
        generation = GenerationConfig.from_pretrained(str(base_path))
    except OSError:
        generation = GenerationConfig()
    generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    generation.pad_token_id = pad_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    merged.generation_config = generation
    merged.config.eos_token_id = stops[0] if stops else merged.config.eos_token_id
    merged.config.pad_token_id = pad_id

    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))

    adapter_out = out / ADAPTER_SUBDIR
    adapter_out.mkdir()
    for name in (ADAPTER_FILE, "adapter_config.json"):
        shutil.copy2(adapter_dir / name, adapter_out / name)
    (out / MANIFEST).write_text(
        json.dumps({**manifest, "template": template, "stop": stop_strings(template, tokenizer)}, indent=1)
    )
    return Merged(model=merged, tokenizer=tokenizer, stop_ids=stops)
