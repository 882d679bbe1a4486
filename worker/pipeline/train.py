"""LoRA training: the base model, the adapter, and a lean loop built for resumable, observable runs.

A hand-written loop rather than ``transformers.Trainer`` because every step must answer to the job: the cancel
and shutdown flags are read before each micro-batch, progress goes to the database, and a checkpoint restores
the run exactly. Step ``s`` always trains the same micro-batches (epoch ``s // steps_per_epoch``, shuffled by
seed and epoch), so a resumed run continues where the dead one stopped and ends on the same step.

Speed on CPU comes from three things: no padding (a batch's examples are packed into one row whose position ids
restart per example, so nothing crosses between examples; attention runs per example where the architecture
allows, ``worker.pipeline.attention``, else over the row with a block-diagonal mask), the output layer applied
only at trained positions (the vocabulary projection is a large share of a small model), and bf16 where the CPU
computes it natively. Batches stay plain random ones: length-grouped batches also cut padding but measured a worse
final loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from core.contracts import Hyperparameters
from worker.pipeline.attention import BASE as BASE_ATTENTION
from worker.pipeline.attention import NAME as PACKED_ATTENTION
from worker.pipeline.attention import attention_implementation, set_attention, use_packed_attention
from worker.pipeline.checkpoints import LoopState, checkpoint_name, load_checkpoint, read_state, save_checkpoint
from worker.pipeline.data import (
    IGNORE,
    Batch,
    Example,
    collate,
    epoch_batches,
    pack_batch,
    pad_batch,
    steps_per_epoch,
)
from worker.pipeline.device import Compute
from worker.pipeline.distributed import Distribution, stand_in
from worker.pipeline.errors import PipelineError, StopReason, TrainingStopped

log = logging.getLogger("conch.worker.train")

# Config attributes of models whose forward changes logits after the output layer; they take the slow path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class TrainingHooks(Protocol):
    """How the loop talks to the outside world (the job in the database, or a benchmark)."""

    def should_stop(self) -> StopReason | None: ...

    def on_log(self, metrics: dict[str, Any]) -> None: ...

    def on_eval_start(self, step: int) -> None: ...

    def on_eval(self, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, step: int, folder: Path, metrics: dict[str, Any]) -> None: ...


class SilentHooks:
    """Hooks that never stop the loop and ignore every report: the base of runs outside a job (benchmarks,
    tests), which override what they watch."""

    def should_stop(self) -> StopReason | None:
        return None

    def on_log(self, metrics: dict[str, Any]) -> None:
        pass

    def on_eval_start(self, step: int) -> None:
        pass

    def on_eval(self, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, folder: Path, metrics: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class StepPlan:
    examples: int
    batch_size: int
    accumulation: int
    epochs: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    devices: int = 1  # processes sharing each step; a step takes batch_size x accumulation x devices examples

    @classmethod
    def build(cls, examples: int, hp: Hyperparameters, devices: int = 1) -> StepPlan:
        per_epoch = steps_per_epoch(examples, hp.per_device_train_batch_size * devices, hp.gradient_accumulation_steps)
        total = max(1, math.ceil(hp.num_train_epochs * per_epoch))
        return cls(
            examples=examples,
            batch_size=hp.per_device_train_batch_size,
            accumulation=hp.gradient_accumulation_steps,
            epochs=hp.num_train_epochs,
            steps_per_epoch=per_epoch,
            total_steps=total,
            warmup_steps=math.ceil(hp.warmup_ratio * total),
            devices=devices,
        )

    def to_json(self) -> dict[str, Any]:
        # num_devices only when above 1, so one-process checkpoints written before it existed still resume
        # (the plan is part of a checkpoint's data fingerprint).
        return ({"num_devices": self.devices} if self.devices > 1 else {}) | {
            "examples": self.examples,
            "batch_size": self.batch_size,
            "gradient_accumulation_steps": self.accumulation,
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


@dataclass
class TrainResult:
    adapter_dir: Path  # the final checkpoint (its adapter files are a loadable PEFT adapter)
    steps: int
    trained_tokens: int
    metrics: dict[str, Any]


# ------------------------------------------------------------------------------------------------ model


def load_base_model(
    base_path: Path, compute: Compute, *, quantization: str = "none", gradient_checkpointing: bool = False
) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantization == "4bit":  # QLoRA: NF4 weights with double-quantized constants (device.check_quantization)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute.autocast_dtype or torch.float32,
        )
        kwargs["device_map"] = {"": compute.device}  # quantized weights are placed while loading, not moved later
    model = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=compute.frozen_dtype, use_safetensors=True, trust_remote_code=False, **kwargs
    )
    # Non-reentrant checkpointing needs no gradient on the inputs, so the frozen embeddings stay frozen.
    checkpointing = {"use_reentrant": False}
    if quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    if gradient_checkpointing:
        # transformers 5.24 renamed it (the old name warns); older releases have only the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    return model.to(compute.device)  # type: ignore[arg-type]


def lora_target_modules(target: str | list[str]) -> str | list[str]:
    """``all`` (LLaMA-Factory's word) -> peft's every-linear-layer-but-the-output-head; else module names."""
    raw = target.split(",") if isinstance(target, str) else target
    names = [t.strip() for t in raw if t.strip()]
    return "all-linear" if names == ["all"] else names


def lora_config(hp: Hyperparameters) -> Any:
    """The job's LoRA adapter as peft describes it (supervised and DPO recipes alike)."""
    from peft import LoraConfig

    alpha = hp.effective_lora_alpha
    return LoraConfig(
        r=hp.lora_rank,
        # peft annotates an int but computes alpha / r in floats; keep whole numbers whole.
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,  # type: ignore[arg-type]
        lora_dropout=hp.lora_dropout,
        target_modules=lora_target_modules(hp.lora_target),
        task_type="CAUSAL_LM",
        bias="none",
    )


def attach_lora(model: Any, hp: Hyperparameters, seed: int) -> Any:
    from peft import get_peft_model

    config = lora_config(hp)
    torch.manual_seed(seed)  # the adapter's initial weights follow the job's seed
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise PipelineError("invalid_lora_target", f"lora_target: {exc}", "lora_target") from exc
    # LoRA weights train in fp32 whatever the frozen weights are stored in (autocast does the bf16 math).
    for parameter in peft_model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return peft_model


def trainable_parameters(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def data_fingerprint(examples: Sequence[Example], plan: StepPlan, seed: int) -> str:
    """Identifies what a checkpoint was trained on; a resume only continues a run with the same one."""
    digest = hashlib.sha256(f"{seed}:{plan.to_json()}".encode())
    for example in examples:
        digest.update(b"%d:" % len(example))
        digest.update(",".join(map(str, example.input_ids)).encode())
        digest.update(",".join(map(str, example.labels)).encode())
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ loss


class LossFunction:
    """Summed next-token cross entropy over trained positions (the caller divides by the step's targets).

    Each call also counts the trained positions whose most likely token is the target (``correct``), for the
    token accuracy the result files report: one argmax over logits already computed.
    """

    correct: int = 0

    def __init__(self, model: Any, compute: Compute) -> None:
        self.model = model
        self.compute = compute
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.config = inner.config
        has_transform = any(getattr(self.config, name, None) for name in _LOGIT_TRANSFORMS)
        decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        self.decoder = decoder
        self.head = head
        self.fast = decoder is not None and head is not None and not has_transform

    def _autocast(self) -> Any:
        dtype = self.compute.autocast_dtype
        return torch.autocast(self.compute.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def outputs(self, batch: Batch) -> torch.Tensor:
        """Last hidden states on the fast path, logits otherwise."""
        kwargs = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids,
            "use_cache": False,
        }
        with self._autocast():
            if self.fast:
                assert self.decoder is not None
                return self.decoder(**kwargs).last_hidden_state
            return self.model(**kwargs).logits

    def __call__(self, batch: Batch) -> torch.Tensor:
        out = self.outputs(batch)
        if self.fast:
            assert self.head is not None
            selected = batch.targets != IGNORE
            with self._autocast():
                # Only trained positions go through the vocabulary projection.
                logits = self.head(out[selected])
            self.correct = int((logits.detach().argmax(-1) == batch.targets[selected]).sum())
            return F.cross_entropy(logits.float(), batch.targets[selected], reduction="sum")
        self.correct = int((out.detach().argmax(-1) == batch.targets).sum())  # IGNORE is never a token id
        return F.cross_entropy(out.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum")


# Attention kernels reach a smaller share of peak than matrix products: on a 2-core AVX512-BF16 CPU, a packed
# row of ~270 tokens spent 0.36 s in attention per 1 s in the linear layers, four times the FLOP ratio (masked
# attention over the whole row; per-example attention only changes which contexts count, see ``packing_pays``).
_ATTENTION_EFFICIENCY = {"cpu": 0.25}


def attention_ratio(config: Any, device_type: str = "cpu") -> float:
    """Context length at which attention costs a token as much as the linear layers do (see ``packing_pays``)."""
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    linear = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * intermediate
    return 2 * linear / (4 * q_dim) * _ATTENTION_EFFICIENCY.get(device_type, 1.0)


@torch.no_grad()
def packing_supported(loss_fn: LossFunction, seed: int = 0) -> bool:
    """Check on two short random sequences that a packed row gives what separate padded rows give.

    Packing relies on the model turning restarting position ids into a block-diagonal mask; a model that does
    not would let examples attend to each other, so it trains padded instead.
    """
    vocab = int(getattr(loss_fn.config, "vocab_size", 2) or 2)
    generator = torch.Generator().manual_seed(seed)
    lengths = (5, 8)
    examples = [Example(torch.randint(0, vocab, (n,), generator=generator).tolist(), [IGNORE] * n) for n in lengths]
    was_training = loss_fn.model.training
    loss_fn.model.eval()
    try:
        device = loss_fn.compute.device
        padded = loss_fn.outputs(pad_batch(examples, 0).to(device)).float()
        packed = loss_fn.outputs(pack_batch(examples).to(device)).float()[0]
    except Exception as exc:  # the architecture refuses position ids or packed rows
        log.info("train.packing_unsupported", extra={"error": str(exc)[:200]})
        return False
    finally:
        loss_fn.model.train(was_training)
    expected = torch.cat([padded[0, : lengths[0]], padded[1, : lengths[1]]])
    scale = float(expected.abs().max()) or 1.0
    return float((expected - packed).abs().max()) / scale < 0.05


# ------------------------------------------------------------------------------------------------ loop


class LoraTrainer:
    def __init__(
        self,
        model: Any,
        train: list[Example],
        evaluation: list[Example],
        hp: Hyperparameters,
        *,
        seed: int,
        compute: Compute,
        pad_id: int,
        checkpoint_root: Path,
        hooks: TrainingHooks,
        group_by_length: bool = False,
        packing: bool = True,
        per_example_attention: bool = True,
        clock: Callable[[], float] = time.monotonic,
        distribution: Distribution | None = None,
    ) -> None:
        from transformers import get_scheduler

        self.model = model
        self.train_examples = train
        self.eval_examples = evaluation
        self.hp = hp
        self.seed = seed
        self.compute = compute
        self.pad_id = pad_id
        self.checkpoint_root = checkpoint_root
        self.hooks = hooks
        self.group_by_length = group_by_length
        self.clock = clock
        # One of several processes (worker.pipeline.distributed): this one trains its share of every step.
        self.distribution = distribution
        self.plan = StepPlan.build(len(train), hp, distribution.world_size if distribution else 1)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # weight_decay 0 as in LLaMA-Factory's LoRA recipes. The fused kernel updates every LoRA tensor in one call
        # (CPU and CUDA): with all linear layers adapted a model has hundreds of small tensors, and the per-tensor
        # loop cost 17-85 ms a step against 3-5 ms fused (SmolLM2-135M, r=8, 2-core Intel Xeon with AMX).
        self.optimizer = torch.optim.AdamW(self.params, lr=hp.learning_rate, weight_decay=0.0, fused=True)
        self.scheduler = get_scheduler(
            hp.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.plan.warmup_steps,
            num_training_steps=self.plan.total_steps,
        )
        self.scaler = torch.amp.GradScaler(compute.device.type, enabled=compute.precision == "fp16")
        self.loss_fn = LossFunction(model, compute)
        self.step_optimizer: Any = self.optimizer
        self.step_loss: Callable[[Batch], torch.Tensor] = self.loss_fn
        # Packed rows carry no padding; they are used where the model keeps packed examples apart. Attention in a
        # packed row runs per example where the architecture allows it and gives what padded rows give; else over
        # the whole row with a block-diagonal mask.
        self.per_example_attention = False
        self.attention_ratio: float | None = None
        if packing:
            self.per_example_attention = (
                per_example_attention and use_packed_attention(model) and packing_supported(self.loss_fn, seed)
            )
            if not self.per_example_attention and attention_implementation(model) == PACKED_ATTENTION:
                set_attention(model, BASE_ATTENTION)
            if self.per_example_attention or packing_supported(self.loss_fn, seed):
                self.attention_ratio = attention_ratio(self.loss_fn.config, compute.device.type)
        if distribution is not None:  # after the packing check: FSDP's units gather shards only in full passes
            module, self.step_optimizer = distribution.prepare(self.loss_fn, self.optimizer)
            self.step_loss = lambda b: module(b.input_ids, b.attention_mask, b.position_ids, b.targets)
        self.lengths = [len(e) for e in train]
        self.state = LoopState(
            total_steps=self.plan.total_steps,
            data_fingerprint=data_fingerprint(train, self.plan, seed),
        )
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.eval_token_accuracy = 0.0  # of the latest evaluation
        self._last_saved_step: int | None = None

    # ---------------------------------------------------------------------------------------- state

    def matches(self, folder: Path) -> bool:
        """Whether a checkpoint continues this very run (same examples, order and plan)."""
        return read_state(folder).data_fingerprint == self.state.data_fingerprint

    def resume(self, folder: Path) -> None:
        if not self.matches(folder):
            raise PipelineError(
                "checkpoint_mismatch",
                "the job's last checkpoint was trained on different data or settings; it cannot be resumed",
            )
        load = self.distribution.load_checkpoint if self.distribution else load_checkpoint
        state = load(folder, self.model, self.optimizer, self.scheduler, self.scaler)
        self.state = state
        self._last_saved_step = state.step
        log.info("train.resumed", extra={"step": state.step, "checkpoint": str(folder)})

    def save(self) -> Path:
        write = self.distribution.save_checkpoint if self.distribution else save_checkpoint
        folder = write(self.checkpoint_root, self.model, self.optimizer, self.scheduler, self.state, self.scaler)
        self._last_saved_step = self.state.step
        self.hooks.on_checkpoint(self.state.step, folder, self._checkpoint_metrics())
        return folder

    def _checkpoint_metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {"step": self.state.step, "epoch": self.epoch_at(self.state.step)}
        if self.state.epoch_targets:
            metrics["train_loss"] = self.state.epoch_loss_sum / self.state.epoch_targets
        elif self.state.last_epoch_loss is not None:
            metrics["train_loss"] = self.state.last_epoch_loss
        if self.state.eval_loss is not None:
            metrics["eval_loss"] = self.state.eval_loss
        return metrics

    # ---------------------------------------------------------------------------------------- batches

    def epoch_at(self, step: int) -> float:
        return round(step / self.plan.steps_per_epoch, 4)

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = epoch_batches(
                self.lengths,
                self.plan.batch_size * self.plan.devices,
                self.seed,
                epoch,
                group_by_length=self.group_by_length,
            )
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def micro_batches(self, step: int) -> list[Batch]:
        epoch, index = divmod(step, self.plan.steps_per_epoch)
        chosen = self._batches(epoch)[index * self.plan.accumulation : (index + 1) * self.plan.accumulation]
        return [self._share(ids) for ids in chosen]

    def _share(self, ids: list[int]) -> Batch:
        """This process's part of one micro-batch: all of it, or with several processes every n-th example
        (together they take exactly what one process would, so the step's gradient is the same)."""
        if self.distribution is None:
            return self._collate([self.train_examples[i] for i in ids])
        mine = ids[self.distribution.rank :: self.distribution.world_size]
        if not mine:
            return stand_in(self._collate([self.train_examples[ids[0]]]))
        return self._collate([self.train_examples[i] for i in mine])

    def _collate(self, examples: list[Example]) -> Batch:
        return collate(
            examples, self.pad_id, attention_ratio=self.attention_ratio, per_example=self.per_example_attention
        )

    # ---------------------------------------------------------------------------------------- stepping

    def _check_stop(self) -> None:
        reason = self.hooks.should_stop()
        if reason is None:
            return
        checkpoint_step = None
        if reason == "shutdown" and self.state.step > 0:
            # A graceful stop keeps the work done so far; an unfinished accumulation is simply dropped.
            self.optimizer.zero_grad(set_to_none=True)
            if self._last_saved_step != self.state.step:
                self.save()
            checkpoint_step = self.state.step
        raise TrainingStopped(reason, checkpoint_step)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over its micro-batches; returns the step's figures."""
        batches = self.micro_batches(self.state.step)
        targets = sum(b.target_count for b in batches)
        tokens = sum(b.tokens for b in batches)
        dist = self.distribution
        if dist is not None:  # the whole step's counts, over every process's share
            targets, tokens = (int(v) for v in dist.sum(targets, tokens))
        # Distributed gradients are averaged over the processes; x world size makes them the sum again.
        scale = (dist.world_size if dist else 1) / max(targets, 1)
        loss_sum, correct = 0.0, 0
        self.model.train()
        for index, batch in enumerate(batches):
            self._check_stop()
            with dist.no_sync(index == len(batches) - 1) if dist else contextlib.nullcontext():
                loss = self.step_loss(batch.to(self.compute.device))
                loss_sum += float(loss.detach())
                correct += self.loss_fn.correct
                # Normalised by the whole step's targets, so accumulation equals one big batch.
                scaled = self.scaler.scale(loss * scale)
                if dist is not None:
                    dist.backward(scaled)
                else:
                    scaled.backward()
        if dist is not None:
            loss_sum, summed_correct = dist.sum(loss_sum, correct)
            correct = int(summed_correct)
        self.scaler.unscale_(self.step_optimizer)
        limit = self.hp.max_grad_norm if self.hp.max_grad_norm > 0 else math.inf
        if dist is not None:
            grad_norm = dist.clip_grad_norm(self.params, limit)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
        learning_rate = float(self.scheduler.get_last_lr()[0])
        self.scaler.step(self.step_optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step_optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += tokens
        self.state.epoch_loss_sum += loss_sum
        self.state.epoch_targets += targets
        return {
            "loss_sum": loss_sum,
            "correct": correct,
            "targets": targets,
            "tokens": tokens,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
        }

    def measure_throughput(self) -> float:
        """Non-pad tokens per second of a forward and backward pass on the run's first micro-batch.

        Timed on a second pass (the first one builds kernels), with the RNG state put back and the gradients
        dropped, so the run itself is unchanged. Feeds the pre-flight estimate of the training time.
        """
        batch = self.micro_batches(0)[0].to(self.compute.device)
        devices = [self.compute.device] if self.compute.device.type == "cuda" else []
        self.model.train()
        seconds = 0.0
        with torch.random.fork_rng(devices=devices, device_type=self.compute.device.type):
            for _ in range(2):
                started = time.perf_counter()
                (self.step_loss(batch) / max(batch.target_count, 1)).backward()
                if self.compute.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
        self.optimizer.zero_grad(set_to_none=True)
        # With several processes each one passes its share at the same time.
        return batch.tokens * self.plan.devices / max(seconds, 1e-9)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_examples:
            return None
        self.model.eval()
        order = sorted(range(len(self.eval_examples)), key=lambda i: len(self.eval_examples[i]))
        total, count, correct = 0.0, 0, 0
        size = self.plan.batch_size
        shares = [(start, True) for start in range(0, len(order), size)]
        if self.distribution is not None:  # every process evaluates every n-th batch (under FSDP, as many)
            shares = self.distribution.deal([start for start, _ in shares])
        for start, counted in shares:
            batch = self._collate([self.eval_examples[i] for i in order[start : start + size]])
            batch = batch if counted else stand_in(batch)
            total += float(self.step_loss(batch.to(self.compute.device)))
            correct += self.loss_fn.correct
            count += batch.target_count
        if self.distribution is not None:
            total, summed_count, summed_correct = self.distribution.sum(total, count, correct)
            count, correct = int(summed_count), int(summed_correct)
        self.model.train()
        self.eval_token_accuracy = correct / max(count, 1)
        return total / max(count, 1)

    def run(self) -> TrainResult:
        plan = self.plan
        started = self.clock()
        window = {"loss_sum": 0.0, "correct": 0, "targets": 0, "tokens": 0, "started": started}
        start_step, start_tokens = self.state.step, self.state.tokens_seen
        while self.state.step < plan.total_steps:
            self._check_stop()
            figures = self.train_step()
            step = self.state.step
            for key in ("loss_sum", "correct", "targets", "tokens"):
                window[key] += figures[key]
            epoch_end = step % plan.steps_per_epoch == 0 or step == plan.total_steps
            if step % self.hp.logging_steps == 0 or step == plan.total_steps:
                now = self.clock()
                elapsed = max(now - float(window["started"]), 1e-9)
                per_step = (now - started) / max(step - start_step, 1)
                self.hooks.on_log(
                    {
                        "step": step,
                        "total_steps": plan.total_steps,
                        "epoch": self.epoch_at(step),
                        "loss": round(float(window["loss_sum"]) / max(int(window["targets"]), 1), 6),
                        "token_accuracy": round(int(window["correct"]) / max(int(window["targets"]), 1), 6),
                        "learning_rate": figures["learning_rate"],
                        "grad_norm": round(figures["grad_norm"], 6),
                        "tokens_per_second": round(int(window["tokens"]) / elapsed, 2),
                        "eta_seconds": round(per_step * (plan.total_steps - step), 1),
                        "trained_tokens": self.state.tokens_seen,
                    }
                )
                window = {"loss_sum": 0.0, "correct": 0, "targets": 0, "tokens": 0, "started": now}
            if epoch_end:
                self._end_epoch(step)
            if self.hp.save_steps and step % self.hp.save_steps == 0 and step != plan.total_steps:
                self.save()
        if self._last_saved_step != self.state.step:
            self.save()
        runtime = self.clock() - started
        return TrainResult(
            adapter_dir=self.checkpoint_root / checkpoint_name(self.state.step),
            steps=self.state.step,
            trained_tokens=self.state.tokens_seen,
            metrics=self._final_metrics(runtime, start_step, self.state.tokens_seen - start_tokens),
        )

    def _end_epoch(self, step: int) -> None:
        if self.state.epoch_targets:
            self.state.last_epoch_loss = self.state.epoch_loss_sum / self.state.epoch_targets
        self.state.epoch_loss_sum, self.state.epoch_targets = 0.0, 0
        if self.eval_examples:
            self.hooks.on_eval_start(step)
        eval_loss = self.evaluate()
        if eval_loss is not None:
            self.state.eval_loss = eval_loss
            record = {
                "step": step,
                "epoch": self.epoch_at(step),
                "eval_loss": round(eval_loss, 6),
                "eval_token_accuracy": round(self.eval_token_accuracy, 6),
            }
            self.state.history.append(record)
            self.hooks.on_eval({**record, "total_steps": self.plan.total_steps})

    def _final_metrics(self, runtime: float, start_step: int, tokens: int) -> dict[str, Any]:
        trainable, total = trainable_parameters(self.model)
        metrics: dict[str, Any] = {
            "steps": self.state.step,
            "epochs": self.epoch_at(self.state.step),
            "train_loss": self.state.last_epoch_loss,
            "trained_tokens": self.state.tokens_seen,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_runtime_seconds": round(runtime, 2),
            "tokens_per_second": round(tokens / runtime, 2) if runtime > 0 and tokens else None,
            "resumed_from_step": start_step or None,
            "compute": self.compute.describe(),
            "num_devices": self.plan.devices if self.plan.devices > 1 else None,
        }
        if self.state.eval_loss is not None:
            metrics["eval_loss"] = self.state.eval_loss
        return {k: v for k, v in metrics.items() if v is not None}
