"""Reference answers and the fidelity measure on tiny real models: the reference is transformers' own greedy
answer, a broken reference is refused, and the measure tells a faithful route from a drifting one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from artifacts.golden import (
    BUILTIN_PROMPTS,
    MAX_PROMPTS,
    Reference,
    ReferenceError,
    compare,
    compute_reference,
    encode_prompts,
    golden_conversations,
)
from core.templates import render_prompt


def _model_and_tokenizer(folder: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def _reference(folder: Path, **kwargs: object) -> tuple[Reference, object, object]:
    model, tokenizer = _model_and_tokenizer(folder)
    conversations, source = golden_conversations(None)
    stop = [int(tokenizer.eos_token_id)]  # type: ignore[attr-defined]
    reference = compute_reference(model, tokenizer, "auto", conversations, prompts=source, stop_ids=stop, **kwargs)
    return reference, model, tokenizer


def test_golden_prompts_are_the_validation_prompts_when_there_are_some() -> None:
    validation = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Q{i}"},
            {"role": "assistant", "content": "A"},
        ]
        for i in range(MAX_PROMPTS + 3)
    ]
    prompts, source = golden_conversations(validation)
    assert source == "validation" and len(prompts) == MAX_PROMPTS
    assert prompts[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q0"}]
    builtin, source = golden_conversations(None)
    assert source == "builtin" and [p[0]["content"] for p in builtin] == list(BUILTIN_PROMPTS)
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in text) for text in BUILTIN_PROMPTS), "Chinese prompts too"


def test_the_reference_is_transformers_own_greedy_answer(tiny_models: dict[str, Path]) -> None:
    reference, model, tokenizer = _reference(tiny_models["tiny-llama"])
    assert reference.prompts == "builtin" and len(reference.cases) == len(BUILTIN_PROMPTS)
    case = reference.cases[1]
    text = render_prompt(tokenizer, [{"role": "user", "content": BUILTIN_PROMPTS[1]}], "auto")  # type: ignore[arg-type]
    assert case.prompt_ids == tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    # One prompt alone, no padding: the same greedy tokens as the batched reference.
    alone = model.generate(  # type: ignore[attr-defined]
        torch.tensor([case.prompt_ids]),
        max_new_tokens=len(case.continuation),
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
    )[0, len(case.prompt_ids) :].tolist()
    assert alone == case.continuation
    # The reference's top token at each step is the token it chose.
    assert [ids[0] for ids in case.top_ids] == case.continuation


def test_a_reference_round_trips_through_its_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    reference, _, _ = _reference(tiny_models["tiny-qwen2"])
    reference.save(tmp_path / "reference.json")
    assert Reference.load(tmp_path / "reference.json") == reference


def test_a_model_with_broken_weights_has_no_reference(tiny_models: dict[str, Path]) -> None:
    model, tokenizer = _model_and_tokenizer(tiny_models["tiny-llama"])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))  # type: ignore[attr-defined]
    conversations, source = golden_conversations(None)
    with pytest.raises(ReferenceError, match="non-finite"):
        compute_reference(model, tokenizer, "auto", conversations, prompts=source, stop_ids=[2])


def test_a_model_that_answers_nothing_has_no_reference(tiny_models: dict[str, Path]) -> None:
    model, tokenizer = _model_and_tokenizer(tiny_models["tiny-llama"])
    with torch.no_grad():  # a zero final norm: every logit is 0, and greedy takes the first token, id 0
        model.model.norm.weight.zero_()  # type: ignore[attr-defined]
    conversations, source = golden_conversations(None)
    with pytest.raises(ReferenceError, match="empty answers"):  # id 0 named as the stop token: no answer at all
        compute_reference(model, tokenizer, "auto", conversations, prompts=source, stop_ids=[0])


def test_a_template_that_does_not_render_has_no_reference(tiny_models: dict[str, Path]) -> None:
    _, tokenizer = _model_and_tokenizer(tiny_models["tiny-llama"])
    tokenizer.chat_template = "{{ raise_exception('this template refuses every conversation') }}"  # type: ignore[attr-defined]
    with pytest.raises(ReferenceError, match="template"):
        encode_prompts(tokenizer, "auto", [[{"role": "user", "content": "hi"}]])


def _logits_from(reference: Reference, vocab: int, noise: float, seed: int = 0) -> list[np.ndarray]:
    """Logits a route might give: the reference's own log-probabilities on its top tokens, the rest of its
    probability spread evenly over the other tokens, plus Gaussian noise of the given size."""
    rng = np.random.default_rng(seed)
    out = []
    for case in reference.cases:
        rows = np.empty((len(case.continuation), vocab))
        for step, (ids, logprobs) in enumerate(zip(case.top_ids, case.top_logprobs, strict=True)):
            rest = max(1e-12, 1.0 - float(np.exp(logprobs).sum()))
            rows[step] = np.log(rest / (vocab - len(ids)))
            rows[step, ids] = logprobs
        out.append(rows + rng.normal(0.0, noise, rows.shape) if noise else rows)
    return out


def test_the_measure_tells_a_faithful_route_from_a_drifting_one(tiny_models: dict[str, Path]) -> None:
    reference, model, _ = _reference(tiny_models["tiny-llama"])
    vocab = int(model.config.vocab_size)  # type: ignore[attr-defined]
    same = compare(reference, _logits_from(reference, vocab, 0.0))
    assert same.agreement == 1.0 and same.max_kl < 1e-3 and same.tokens == reference.tokens
    drifting = compare(reference, _logits_from(reference, vocab, 2.0))
    assert drifting.agreement < 0.9 and drifting.max_kl > 0.1
    assert sum(drifting.disagreements) == round((1 - drifting.agreement) * drifting.tokens)


def test_non_finite_route_logits_count_as_disagreement(tiny_models: dict[str, Path]) -> None:
    reference, model, _ = _reference(tiny_models["tiny-llama"])
    logits = _logits_from(reference, int(model.config.vocab_size), 0.0)  # type: ignore[attr-defined]
    logits[0][0, 0] = np.nan
    result = compare(reference, logits)
    assert result.agreement < 1.0 and result.max_kl == float("inf")
