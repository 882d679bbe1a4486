"""The training loop on tiny models: each knob takes effect, packing equals padding, checkpoints resume exactly,
stop requests are obeyed, and the merged model answers like base + adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from core.contracts import Hyperparameters
from tests.factories import alpaca_records
from worker.pipeline.data import PreparedData, pack_batch, pad_batch, prepare_data
from worker.pipeline.device import Compute, resolve_compute
from worker.pipeline.errors import PipelineError, TrainingStopped
from worker.pipeline.train import (
    LoraTrainer,
    LossFunction,
    StepPlan,
    TrainResult,
    attach_lora,
    load_base_model,
    packing_supported,
    trainable_parameters,
)

FP32 = Compute(torch.device("cpu"), "fp32")


class Recorder:
    """Training hooks that keep what the loop reports; optionally asks to stop after a given step."""

    def __init__(self, stop_after: int | None = None, reason: str = "shutdown") -> None:
        self.logs: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.eval_starts: list[int] = []
        self.checkpoints: list[int] = []
        self.stop_after = stop_after
        self.reason = reason

    def should_stop(self) -> Any:
        if self.stop_after is not None and self.logs and self.logs[-1]["step"] >= self.stop_after:
            return self.reason
        return None

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(metrics)

    def on_eval_start(self, step: int) -> None:
        self.eval_starts.append(step)

    def on_eval(self, metrics: dict[str, Any]) -> None:
        assert self.eval_starts and self.eval_starts[-1] == metrics["step"], "an evaluation must be announced first"
        self.evals.append(metrics)

    def on_checkpoint(self, step: int, folder: Path, metrics: dict[str, Any]) -> None:
        self.checkpoints.append(step)


def conversations(n: int = 8) -> list[list[dict[str, Any]]]:
    return [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        for r in alpaca_records(n)
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_models: dict[str, Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["tiny-llama"]))


def data_for(tokenizer: Any, hp: Hyperparameters, n: int = 8, seed: int = 3) -> PreparedData:
    return prepare_data(tokenizer, conversations(n), None, hp, seed)


def trainer_for(
    base: Path,
    tokenizer: Any,
    hp: Hyperparameters,
    root: Path,
    hooks: Recorder,
    *,
    seed: int = 3,
    compute: Compute = FP32,
    n: int = 8,
    **kw: Any,
) -> LoraTrainer:
    data = data_for(tokenizer, hp, n, seed)
    model = attach_lora(load_base_model(base, compute), hp, seed)
    return LoraTrainer(
        model,
        data.train,
        data.eval,
        hp,
        seed=seed,
        compute=compute,
        pad_id=tokenizer.pad_token_id,
        checkpoint_root=root,
        hooks=hooks,
        **kw,
    )


def adapter_tensors(model: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


# ------------------------------------------------------------------------------------------------ knobs


def test_lora_rank_alpha_dropout_and_targets_shape_the_adapter(tiny_models: dict[str, Path]) -> None:
    base = tiny_models["tiny-llama"]
    r4 = attach_lora(load_base_model(base, FP32), Hyperparameters(lora_rank=4), 0)
    r8 = attach_lora(load_base_model(base, FP32), Hyperparameters(lora_rank=8, lora_alpha=32, lora_dropout=0.1), 0)
    assert trainable_parameters(r8)[0] == 2 * trainable_parameters(r4)[0]
    layer = r8.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 32 / 8 and layer.lora_dropout["default"].p == 0.1
    assert r4.get_base_model().model.layers[0].self_attn.q_proj.scaling["default"] == 2.0  # alpha = 2 x rank
    all_linear = {n.split(".")[-1] for n, m in r4.named_modules() if hasattr(m, "lora_A")}
    assert all_linear == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    qv = attach_lora(load_base_model(base, FP32), Hyperparameters(lora_target=["q_proj", "v_proj"]), 0)
    assert {n.split(".")[-1] for n, m in qv.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
    as_text = attach_lora(load_base_model(base, FP32), Hyperparameters(lora_target="q_proj,v_proj"), 0)
    assert trainable_parameters(as_text)[0] == trainable_parameters(qv)[0]
    with pytest.raises(PipelineError) as caught:
        attach_lora(load_base_model(base, FP32), Hyperparameters(lora_target=["no_such_module"]), 0)
    assert caught.value.code == "invalid_lora_target" and caught.value.param == "lora_target"


def test_batch_size_accumulation_and_epochs_set_the_steps() -> None:
    assert StepPlan.build(10, Hyperparameters(per_device_train_batch_size=2, num_train_epochs=3)).total_steps == 15
    plan = StepPlan.build(
        10, Hyperparameters(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=3)
    )
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 9)
    assert StepPlan.build(10, Hyperparameters(per_device_train_batch_size=4, num_train_epochs=1.5)).total_steps == 5
    assert (
        StepPlan.build(
            10, Hyperparameters(per_device_train_batch_size=2, num_train_epochs=1, warmup_ratio=0.2)
        ).warmup_steps
        == 1
    )


def test_compute_type_resolution() -> None:
    from worker.pipeline.device import cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert resolve_compute("auto", cpu).precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_compute("fp32", cpu).autocast_dtype is None
    assert resolve_compute("bf16", cpu).frozen_dtype == torch.bfloat16
    with pytest.raises(PipelineError) as caught:
        resolve_compute("fp16", cpu)
    assert (caught.value.code, caught.value.param) == ("unsupported_compute_type", "compute_type")


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_accumulation_and_scheduler_and_logging(
    arch: str, tiny_models: dict[str, Path], tokenizer: Any, tmp_path: Path
) -> None:
    hooks = Recorder()
    hp = Hyperparameters(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        lr_scheduler_type="linear",
        warmup_ratio=0.25,
        save_steps=0,
    )
    result = trainer_for(tiny_models[arch], tokenizer, hp, tmp_path, hooks).run()
    assert result.steps == 4 and [m["step"] for m in hooks.logs] == [1, 2, 3, 4]
    rates = [m["learning_rate"] for m in hooks.logs]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(1e-3) and rates[1] > rates[2] > rates[3]
    first = hooks.logs[0]
    assert set(first) >= {
        "step",
        "total_steps",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "eta_seconds",
        "trained_tokens",
    }
    assert first["total_steps"] == 4 and hooks.logs[-1]["epoch"] == 2.0
    assert hooks.checkpoints == [4]  # save_steps=0: only the final checkpoint

    constant = Recorder()
    trainer_for(
        tiny_models[arch],
        tokenizer,
        hp.model_copy(update={"lr_scheduler_type": "constant", "warmup_ratio": 0.0}),
        tmp_path / "c",
        constant,
    ).run()
    assert [m["learning_rate"] for m in constant.logs] == pytest.approx([1e-3] * 4)


def test_learning_rate_and_grad_clipping_change_the_update(
    tiny_models: dict[str, Path], tokenizer: Any, tmp_path: Path
) -> None:
    def trained_delta(**knobs: Any) -> float:
        hp = Hyperparameters(num_train_epochs=1, per_device_train_batch_size=4, save_steps=0, **knobs)
        trainer = trainer_for(tiny_models["tiny-llama"], tokenizer, hp, tmp_path / str(len(knobs)), Recorder())
        before = adapter_tensors(trainer.model)
        trainer.run()
        after = adapter_tensors(trainer.model)
        return sum(float((after[k] - before[k]).abs().sum()) for k in before)

    default = trained_delta()
    assert trained_delta(learning_rate=1e-5) < default / 10
    assert trained_delta(max_grad_norm=1e-4, learning_rate=1e-3, lr_scheduler_type="constant") < default


def test_validation_split_is_evaluated_every_epoch(
    tiny_models: dict[str, Path], tokenizer: Any, tmp_path: Path
) -> None:
    hooks = Recorder()
    hp = Hyperparameters(num_train_epochs=2, per_device_train_batch_size=2, val_size=0.25, save_steps=0)
    result = trainer_for(tiny_models["tiny-llama"], tokenizer, hp, tmp_path, hooks).run()
    assert [e["epoch"] for e in hooks.evals] == [1.0, 2.0]
    assert hooks.eval_starts == [e["step"] for e in hooks.evals]
    assert all(e["eval_loss"] > 0 for e in hooks.evals)
    assert result.metrics["eval_loss"] == pytest.approx(hooks.evals[-1]["eval_loss"], rel=1e-4)
    assert result.steps == 6  # 6 training examples left after holding 2 out


# ------------------------------------------------------------------------------------------------ packing


def test_packed_rows_give_the_loss_of_padded_rows(tiny_models: dict[str, Path], tokenizer: Any) -> None:
    data = data_for(tokenizer, Hyperparameters(), n=4)
    model = attach_lora(load_base_model(tiny_models["tiny-qwen2"], FP32), Hyperparameters(), 0)
    loss_fn = LossFunction(model, FP32)
    assert loss_fn.fast and packing_supported(loss_fn)
    padded, packed = pad_batch(data.train, tokenizer.pad_token_id), pack_batch(data.train)
    assert packed.tokens == padded.tokens and packed.target_count == padded.target_count
    with torch.no_grad():
        assert float(loss_fn(packed)) == pytest.approx(float(loss_fn(padded)), rel=1e-4)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_resume_from_a_checkpoint_ends_like_an_uninterrupted_run(
    tiny_models: dict[str, Path], tokenizer: Any, tmp_path: Path
) -> None:
    hp = Hyperparameters(num_train_epochs=3, per_device_train_batch_size=2, save_steps=5, lora_dropout=0.1)
    base = tiny_models["tiny-llama"]
    straight = trainer_for(base, tokenizer, hp, tmp_path / "straight", Recorder())
    assert straight.measure_throughput() > 0  # the pre-flight measurement leaves the run unchanged
    uninterrupted = straight.run()

    stopping = Recorder(stop_after=7, reason="shutdown")
    first = trainer_for(base, tokenizer, hp, tmp_path / "resumed", stopping)
    with pytest.raises(TrainingStopped) as caught:
        first.run()
    assert caught.value.reason == "shutdown" and caught.value.checkpoint_step == 7
    assert stopping.checkpoints == [5, 7]
    checkpoint = tmp_path / "resumed" / "step-0000007"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "state.json",
    }

    later = Recorder()
    second = trainer_for(base, tokenizer, hp, tmp_path / "resumed", later)
    second.resume(checkpoint)
    resumed = second.run()
    assert resumed.steps == uninterrupted.steps == 12
    assert [m["step"] for m in later.logs] == list(range(8, 13))
    assert resumed.trained_tokens == uninterrupted.trained_tokens
    expected, got = adapter_tensors(straight.model), adapter_tensors(second.model)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)
    assert resumed.metrics["train_loss"] == pytest.approx(uninterrupted.metrics["train_loss"], rel=1e-5)


def test_a_checkpoint_from_other_data_is_refused(tiny_models: dict[str, Path], tokenizer: Any, tmp_path: Path) -> None:
    hp = Hyperparameters(num_train_epochs=1, per_device_train_batch_size=2, save_steps=0)
    result: TrainResult = trainer_for(tiny_models["tiny-llama"], tokenizer, hp, tmp_path, Recorder()).run()
    other = trainer_for(tiny_models["tiny-llama"], tokenizer, hp, tmp_path, Recorder(), n=6)
    with pytest.raises(PipelineError) as caught:
        other.resume(result.adapter_dir)
    assert caught.value.code == "checkpoint_mismatch"


def test_cancel_stops_at_the_next_step_without_a_checkpoint(
    tiny_models: dict[str, Path], tokenizer: Any, tmp_path: Path
) -> None:
    hooks = Recorder(stop_after=2, reason="cancel")
    hp = Hyperparameters(num_train_epochs=2, per_device_train_batch_size=2, save_steps=0)
    with pytest.raises(TrainingStopped) as caught:
        trainer_for(tiny_models["tiny-llama"], tokenizer, hp, tmp_path, hooks).run()
    assert caught.value.reason == "cancel" and caught.value.checkpoint_step is None
    assert [m["step"] for m in hooks.logs] == [1, 2] and hooks.checkpoints == []


# ------------------------------------------------------------------------------------------------ merge


def test_merged_model_matches_base_plus_adapter(tiny_models: dict[str, Path], tokenizer: Any, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from core.storage import atomic_directory
    from worker.pipeline.merge import merge_adapter

    base_path = tiny_models["tiny-llama"]
    hp = Hyperparameters(num_train_epochs=4, per_device_train_batch_size=2, learning_rate=5e-3, save_steps=0)
    result = trainer_for(base_path, tokenizer, hp, tmp_path / "ckpt", Recorder(), compute=resolve_compute("auto")).run()
    out = tmp_path / "merged"
    with atomic_directory(out) as tmp:
        merge_adapter(base_path, result.adapter_dir, tmp, template="auto", manifest={"model_id": "ft:x::y"})

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_path)), str(out / "adapter")
    ).eval()
    base_only = AutoModelForCausalLM.from_pretrained(str(base_path)).eval()
    assert merged.dtype == torch.float32  # the base model's own dtype, whatever training computed in
    ids = tokenizer(
        "<|im_start|>user\nWhat is your name?<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        merged_logits, reference_logits = merged(ids).logits, reference(ids).logits
        assert not torch.allclose(base_only(ids).logits, reference_logits, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(merged_logits, reference_logits, rtol=1e-4, atol=1e-4)
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    assert torch.equal(merged.generate(ids, **greedy), reference.generate(input_ids=ids, **greedy))

    saved_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert saved_tokenizer.chat_template == tokenizer.chat_template
    generation = GenerationConfig.from_pretrained(str(out))
    assert generation.eos_token_id == tokenizer.eos_token_id and generation.pad_token_id == tokenizer.pad_token_id
    manifest = json.loads((out / "conch.json").read_text())
    assert manifest["template"] == "auto" and "<|im_end|>" in manifest["stop"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.rglob("*") if p.is_file())  # readable by services
