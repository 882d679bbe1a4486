"""Per-example attention in packed rows: the loss and the LoRA gradients of the masked whole-row path, the same
outputs wherever it falls back to transformers' ``sdpa``, and the trainer choosing it only where it applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.contracts import Hyperparameters
from tests.tiny_models import build_tiny_model
from worker.pipeline.attention import (
    NAME,
    attention_implementation,
    packed_sdpa,
    segments,
    set_attention,
    use_packed_attention,
)
from worker.pipeline.data import IGNORE, Example, collate, pack_batch, packing_pays, pad_batch
from worker.pipeline.device import Compute
from worker.pipeline.train import LoraTrainer, LossFunction, SilentHooks, attach_lora, load_base_model

FP32 = Compute(torch.device("cpu"), "fp32")
LENGTHS = (7, 12, 5, 12, 9)  # two of equal length: they go through one batched call


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (4 query heads, 2 key/value heads) whose outputs depend on the context (wide initial weights),
    so attending across examples would change them."""
    return build_tiny_model(tmp_path_factory.mktemp("sharp") / "llama", "llama", seed=1, initializer_range=0.3)


def examples(vocab: int, seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Example(
            torch.randint(0, vocab, (n,), generator=generator).tolist(),
            [IGNORE, *torch.randint(0, vocab, (n - 1,), generator=generator).tolist()],
        )
        for n in LENGTHS
    ]


def lora_model(base: Path, compute: Compute = FP32) -> Any:
    model = attach_lora(load_base_model(base, compute), Hyperparameters(), 0)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave every A gradient zero
            torch.nn.init.normal_(parameter, std=0.5)
    return model


def loss_and_gradients(model: Any, loss_fn: LossFunction, batch: Any) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(batch) / batch.target_count
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def test_segments_split_where_position_ids_stop_counting_up() -> None:
    assert segments(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]), 9) == [(0, 3), (3, 5), (5, 9)]
    assert segments(torch.tensor([[0, 1, 2, 3]]), 4) is None  # one sequence: plain causal sdpa
    assert segments(torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]]), 4) is None  # several rows: not Conch's packing
    assert segments(None, 4) is None


def test_packed_sdpa_keeps_examples_apart_without_any_mask() -> None:
    """Given no mask at all, only the position ids tell the examples apart: the output equals SDPA over the
    block-diagonal causal mask and differs from causal attention over the whole row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    lengths = torch.tensor(LENGTHS)
    total = int(lengths.sum())
    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    module.num_key_value_groups = 2  # type: ignore[assignment]
    query, key, value = (torch.randn(1, h, total, 16, dtype=torch.float64) for h in (4, 2, 2))
    positions = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)
    example = torch.repeat_interleave(torch.arange(len(LENGTHS)), lengths)
    mask = (example[:, None] == example[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    got, _ = packed_sdpa(module, query, key, value, None, scaling=0.25, position_ids=positions)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask[None, None], scaling=0.25)
    whole_row, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    assert got.shape == expected.shape == (1, total, 4, 16)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, whole_row, atol=1e-3)


def test_per_example_attention_gives_the_loss_and_lora_gradients_of_masked_attention(sharp_model: Path) -> None:
    """fp32 on both paths: the same products summed in another order, so they agree to float rounding (1e-7
    relative measured on SmolLM2-135M); 1e-5 leaves room for other kernels and still fails by orders of magnitude
    if any token saw another example (the whole-row check below differs by more than 1%)."""
    model = lora_model(sharp_model)
    loss_fn = LossFunction(model, FP32)
    batch = pack_batch(examples(int(loss_fn.config.vocab_size)))
    assert attention_implementation(model) == "sdpa"
    masked_loss, masked_grads = loss_and_gradients(model, loss_fn, batch)

    assert use_packed_attention(model) and attention_implementation(model) == NAME
    loss, grads = loss_and_gradients(model, loss_fn, batch)
    assert loss == pytest.approx(masked_loss, rel=1e-5)
    assert grads.keys() == masked_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(grad, masked_grads[name], rtol=1e-5, atol=1e-5 * float(grad.abs().max()))

    # The same row as one sequence (positions counting through) attends across examples: a different loss.
    whole = pack_batch(examples(int(loss_fn.config.vocab_size)))
    whole.position_ids = torch.arange(whole.input_ids.shape[1]).unsqueeze(0)
    crossed, _ = loss_and_gradients(model, loss_fn, whole)
    assert abs(crossed - loss) / loss > 1e-2


def test_per_example_attention_in_bf16_stays_as_close_to_fp32_as_masked_attention(sharp_model: Path) -> None:
    """Under bf16 autocast the per-example path computes attention in fp32 (faster on CPU): its loss is no
    further from the fp32 loss than the masked bf16 path's (plus bf16's own rounding of the rest)."""
    reference = LossFunction(lora_model(sharp_model), FP32)
    batch = pack_batch(examples(int(reference.config.vocab_size)))
    with torch.no_grad():
        exact = float(reference(batch))
    bf16 = Compute(torch.device("cpu"), "bf16")
    model = lora_model(sharp_model)
    loss_fn = LossFunction(model, bf16)
    with torch.no_grad():
        masked = float(loss_fn(batch))
        assert use_packed_attention(model)
        per_example = float(loss_fn(batch))
    assert abs(per_example - exact) <= abs(masked - exact) + 0.01 * exact


def test_padded_batches_and_generation_fall_back_to_sdpa_unchanged(sharp_model: Path) -> None:
    model = lora_model(sharp_model)
    loss_fn = LossFunction(model, FP32)
    rows = examples(int(loss_fn.config.vocab_size), seed=2)
    padded = pad_batch(rows, 0)
    prompt = torch.tensor([rows[1].input_ids])
    with torch.no_grad():
        before = float(loss_fn(padded))
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6)
        assert use_packed_attention(model)
        assert float(loss_fn(padded)) == pytest.approx(before, rel=1e-6)
        again = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6)
    assert again.tolist() == generated.tolist()


def test_a_model_not_on_sdpa_keeps_its_attention(sharp_model: Path) -> None:
    model = lora_model(sharp_model)
    assert set_attention(model, "eager")
    assert not use_packed_attention(model)
    assert attention_implementation(model) == "eager"


def test_the_trainer_attends_per_example_where_it_applies_and_can_be_told_not_to(
    sharp_model: Path, tmp_path: Path
) -> None:
    def trainer(model: Any, **kwargs: Any) -> LoraTrainer:
        rows = examples(int(model.get_base_model().config.vocab_size))
        return LoraTrainer(
            model,
            rows,
            [],
            Hyperparameters(per_device_train_batch_size=len(rows)),
            seed=0,
            compute=FP32,
            pad_id=0,
            checkpoint_root=tmp_path / str(len(kwargs)),
            hooks=SilentHooks(),
            **kwargs,
        )

    fast = trainer(lora_model(sharp_model))
    assert fast.per_example_attention and fast.attention_ratio is not None
    assert attention_implementation(fast.model) == NAME
    masked = trainer(lora_model(sharp_model), per_example_attention=False)
    assert not masked.per_example_attention and masked.attention_ratio is not None
    assert attention_implementation(masked.model) == "sdpa"
    eager = lora_model(sharp_model)
    assert set_attention(eager, "eager")
    assert not trainer(eager).per_example_attention
    # The same first step either way, in fp32.
    assert fast.micro_batches(0)[0].position_ids is not None
    assert fast.train_step()["loss_sum"] == pytest.approx(masked.train_step()["loss_sum"], rel=1e-5)


def test_packing_costs_the_sum_over_examples_when_attention_is_per_example() -> None:
    long = [4000, 3000, 3500, 3900]
    assert not packing_pays(long, attention_ratio=3000)  # masked: a 14,400-token context for every token
    assert packing_pays(long, attention_ratio=3000, per_example=True)
    assert not packing_pays([4000, 4000], attention_ratio=3000, per_example=True)  # nothing to save
    assert not packing_pays([50], attention_ratio=3000, per_example=True)
    rows = [Example([1] * n, [IGNORE] * n) for n in long]
    assert collate(rows, 0, attention_ratio=3000).position_ids is None
    assert collate(rows, 0, attention_ratio=3000, per_example=True).position_ids is not None
