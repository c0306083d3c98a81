"""The training loop: the transformers Trainer with checkpoints, resume and the schedule."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from distill.argspec import describe
from distill.encoding import Example, SplitHead, split_head
from distill.records import atomic_write_json
from distill.train.args import TrainArgs
from distill.train.data import Collator, LengthBatches, ListDataset, pack
from distill.train.device import DevicePlan
from distill.train.losses import Objective
from distill.train.onpolicy import OnPolicy
from distill.train.ranks import ranks

log = logging.getLogger(__name__)


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint of the highest step under ``checkpoints``, if any."""
    found = [p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _trainer_class(
    objective: Objective,
    on_policy: OnPolicy | None = None,
    split: SplitHead | None = None,
    lengths: list[int] | None = None,
) -> type:
    """The transformers Trainer, its loss ``objective`` for kd and mix (sft: its own loss, unless
    ``split`` computes the logits at the answer's positions only).

    With ``lengths`` (one per training item), batches are of rows of about the same length
    (:class:`LengthBatches`). With ``on_policy``, a drawn share of the batches is rebuilt on the
    student's samples and trained on the KD term alone (see :mod:`distill.train.onpolicy`).
    """
    from transformers import Trainer

    class GroupedTrainer(Trainer):
        """The Trainer, its batches grouped by length when ``lengths`` are given."""

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthBatches(lengths, self.args.per_device_train_batch_size, seed)

    if not objective.uses_teacher and split is None:
        return GroupedTrainer
    kd_only = Objective("kd", objective.temperature)

    class DistillTrainer(GroupedTrainer):
        """The Trainer whose loss is :class:`Objective`, with its parts in the logs."""

        # The objective returns a per-batch mean: the Trainer divides it over accumulation
        # (loss_is_scaled_for_ga says so since transformers 5.2x; model_accepts_loss_kwargs
        # False says so before, and keeps the model from being handed num_items_in_batch).
        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False
            self._parts: dict[str, list[Any]] = {}

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if on_policy is not None and model.training and on_policy.draw():
                rebuilt = on_policy.batch(model, inputs)
                logits = model(
                    input_ids=rebuilt["input_ids"], attention_mask=rebuilt["attention_mask"]
                ).logits
                loss, parts = kd_only.from_logits(
                    logits,
                    rebuilt["labels"],
                    rebuilt["teacher_ids"],
                    rebuilt["teacher_logprobs"],
                )
                parts = {"kd_on_policy": parts["kd"]}
            else:
                loss, parts = objective(model, inputs, split)
            for name, value in parts.items():
                self._parts.setdefault(name, []).append(value)
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:
                for name, values in self._parts.items():
                    logs[name] = round(float(sum(values)) / len(values), 4)
                self._parts = {}
            super().log(logs, *args, **kwargs)

    return DistillTrainer


def train_loop(
    model: Any,
    tokenizer: Any,
    args: TrainArgs,
    plan: DevicePlan,
    examples: list[Example],
    objective: Objective | None = None,
    on_policy: OnPolicy | None = None,
) -> dict[str, Any]:
    """Run the transformers Trainer (checkpoints, resume, accumulation, schedule)."""
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    items: list[Any] = pack(examples, args.max_length) if plan.packing else examples
    cuda = plan.device.startswith("cuda")
    here = ranks()
    # Each optimizer step takes a batch from every process (the Trainer shards the data).
    per_step = plan.batch_size * args.grad_accum * here.world_size
    steps_per_epoch = max(1, math.ceil(len(items) / per_step))
    total_steps = args.max_steps or math.ceil(steps_per_epoch * args.epochs)
    checkpoints = args.output / "checkpoints"
    if here.main:  # the Trainer writes its checkpoints from rank 0 too
        checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_json(checkpoints / "pidistill_config.json", describe(args))
    save = {"save_strategy": "steps", "save_steps": args.save_steps} if args.save_steps else {}
    training_args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        lr_scheduler_type="cosine",
        warmup_steps=max(0, round(0.03 * total_steps)),
        weight_decay=0.0,
        logging_steps=args.logging_steps,
        save_strategy=save.get("save_strategy", "epoch"),
        save_steps=save.get("save_steps", 500),
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        bf16=cuda and plan.dtype == "bfloat16",
        fp16=cuda and plan.dtype == "float16",
        use_cpu=not cuda,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        disable_tqdm=True,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        # Every adapter weight takes part in each forward: no search for unused ones under DDP.
        ddp_find_unused_parameters=False,
    )
    objective = objective or Objective()
    collator = Collator(
        tokenizer.pad_token_id,
        plan.packing,
        multiple_of=8 if cuda else 1,
        teacher=objective.uses_teacher,
    )
    losses: list[dict[str, float]] = []

    class _LogLosses(TrainerCallback):
        def on_log(self, _args: Any, state: Any, _control: Any, logs: Any = None, **_: Any) -> None:
            if logs and "loss" in logs:
                entry = {"step": state.global_step, "loss": round(float(logs["loss"]), 4)}
                names = ("ce", "kd", "kd_on_policy")
                entry.update({k: logs[k] for k in names if k in logs})
                losses.append(entry)
                parts = "".join(f", {k} {logs[k]:.4f}" for k in names if k in logs)
                log.info("step %d: loss %.4f%s", state.global_step, logs["loss"], parts)

    # Logits at the answer's positions only, unless DDP wraps the model (its forward must run)
    # or Liger's fused cross-entropy already skips them (sft with fused kernels).
    split = None
    if here.world_size == 1 and (objective.uses_teacher or not plan.fused_kernels):
        split = split_head(model)
    grouped = args.group_by_length and not plan.packing
    lengths = [len(e.input_ids) for e in items] if grouped else None
    log.info(
        "batches: %s; logits: %s",
        "grouped by length" if grouped else ("packed" if plan.packing else "random"),
        "at the answer's positions" if split else "at every position",
    )
    trainer = _trainer_class(objective, on_policy, split, lengths)(
        model=model,
        args=training_args,
        train_dataset=ListDataset(items),  # type: ignore[arg-type]
        data_collator=collator,
        callbacks=[_LogLosses()],
    )
    trainer.remove_callback(PrinterCallback)  # it prints to stdout, which carries the summary
    resume_from = last_checkpoint(checkpoints) if args.resume else None
    if args.resume and resume_from is None:
        log.warning("--resume: no checkpoint under %s; starting from the beginning", checkpoints)
    elif resume_from:
        log.info("resuming from %s", resume_from)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    elapsed = time.perf_counter() - started
    state = trainer.state
    start_step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    steps_run = state.global_step - start_step
    tokens_per_step = sum(len(e.input_ids) for e in examples) / max(1, len(items)) * per_step
    return {
        "steps": state.global_step,
        "resumed_from_step": start_step or None,
        "epochs": round(float(state.epoch or 0), 3),
        "train_loss": round(float(result.training_loss), 4),
        "losses": losses,
        "batches": "grouped by length" if grouped else ("packed" if plan.packing else "random"),
        "logits": "answer positions" if split else "every position",
        "train_seconds": round(elapsed, 2),
        "seconds_per_step": round(elapsed / steps_run, 4) if steps_run else None,
        "tokens_per_second": round(steps_run * tokens_per_step / elapsed, 1) if elapsed else None,
    }
