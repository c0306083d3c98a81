"""From labelled rows to a merged student: read, encode, load, tune, train, merge, record."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from typing import Any

from distill.argspec import describe
from distill.encoding import Example, encode_all, ensure_pad_token, read_labelled, split_head
from distill.train.args import RESUME_KEYS, TrainArgs, TrainError
from distill.train.data import Collator, data_record
from distill.train.device import (
    apply_fused_kernels,
    autotune,
    compile_layers,
    default_budget_gib,
    pick_device,
    plan_device,
    set_checkpointing,
)
from distill.train.loop import train_loop
from distill.train.losses import Objective, teacher_kl
from distill.train.merge import merge_adapter, save_tokenizer
from distill.train.model import add_adapters, load_model, prepare_base
from distill.train.onpolicy import OnPolicy, load_teacher, stop_ids
from distill.train.ranks import barrier, finish, from_main, main_first, start
from distill.train.teacher import (
    check_rows,
    check_vocabulary,
    encode_rows,
    largest_id,
    max_k,
)

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of what trained the model, for the run record and the card."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("pidistill", "torch", "transformers", "peft", "bitsandbytes", "liger-kernel"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _check_run_dir(args: TrainArgs) -> None:
    checkpoints = args.output / "checkpoints"
    config_file = checkpoints / "pidistill_config.json"
    if args.resume:
        if config_file.is_file():
            before = json.loads(config_file.read_text())
            now = describe(args)
            # A checkpoint made before a field existed was made with that field's default.
            defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
            changed = [
                k
                for k in RESUME_KEYS
                if json.dumps(before.get(k, defaults.get(k))) != json.dumps(now.get(k))
            ]
            if changed:
                raise TrainError(
                    f"--resume: {config_file} was made with other values of "
                    f"{', '.join(changed)}; resume with the same ones or start a new run"
                )
        return
    if args.output.exists() and any(args.output.iterdir()):
        if not args.overwrite:
            raise TrainError(
                f"{args.output}: run directory is not empty (--resume to go on, "
                "--overwrite to replace it)"
            )
        shutil.rmtree(args.output)


def run(args: TrainArgs) -> dict[str, Any]:
    """Train, merge and write the run directory; return the summary.

    Under a launcher every process trains and only rank 0 writes (:mod:`distill.train.ranks`);
    each returns the same summary once the run directory is complete.
    """
    from distill.records import atomic_write_json

    started = time.perf_counter()
    log.info("train config: %s", json.dumps(describe(args), ensure_ascii=False))
    records = read_labelled(args.data)  # eagerly, before any model loads
    train_rows = [r for r in records if r.split == "train"]
    heldout_rows = [r for r in records if r.split == "heldout"]
    if not train_rows:
        raise TrainError("no rows with split train in " + ", ".join(map(str, args.data)))
    objective = Objective(args.loss, args.kd_temperature, args.kd_weight)
    teacher = _check_teacher(args, records) if objective.uses_teacher else None
    here = start(cuda=pick_device(args.device).startswith("cuda"))
    if here.main:
        _check_run_dir(args)
        args.output.mkdir(parents=True, exist_ok=True)
    barrier()

    import torch
    import transformers
    from transformers import AutoTokenizer

    from distill.card_model import write_model_card
    from distill.encoding import answer_perplexity

    transformers.set_seed(args.seed)
    with main_first():  # a layer-dropped base is written once, by rank 0
        base_path, base_info = prepare_base(args, args.output)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    encode = encode_rows if objective.uses_teacher else encode_all
    train_examples, train_stats = encode(train_rows, tokenizer, args.prompt_style, args.max_length)
    heldout_examples, heldout_stats = encode(
        heldout_rows, tokenizer, args.prompt_style, args.max_length
    )
    if not train_examples:
        raise TrainError(f"every training prompt is longer than --max-length {args.max_length}")
    log.info(
        "data: %d training sequences (%d tokens, %d truncated), %d held out",
        len(train_examples),
        train_stats["tokens"],
        train_stats["truncated"],
        len(heldout_examples),
    )

    longest = max(len(e.input_ids) for e in train_examples)
    plan = plan_device(args, longest)
    if args.on_policy and plan.packing:
        # A rebuilt batch takes each row's prompt; packed rows hold several prompts each.
        log.info("packing off: --on-policy samples an answer per row, rows are not packed")
        plan.packing = False
    model = load_model(base_path, args.method, plan.device, plan.dtype)
    top = largest_id([*train_examples, *heldout_examples])
    if top >= model.config.vocab_size:
        raise TrainError(
            f"the teacher's candidates name token id {top}, past the student's "
            f"{model.config.vocab_size} logits"
        )
    if plan.fused_kernels:
        plan.fused_kernels = apply_fused_kernels(model)
    model = add_adapters(model, args, plan.checkpoint_fraction > 0)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("adapters: %s, %d trainable of %d parameters", args.method, trainable, total)

    cuda = plan.device.startswith("cuda")
    if cuda and (args.batch_size is None or args.gradient_checkpointing == "auto"):
        budget = args.memory_budget_gib or default_budget_gib(plan.device)
        length = args.max_length if plan.packing else longest
        batches = (args.batch_size,) if args.batch_size else (4, 8, 16, 24, 32, 48)
        fractions = (
            (plan.checkpoint_fraction,)
            if args.gradient_checkpointing != "auto"
            else (0.0, 0.25, 0.5, 0.75, 1.0)
        )
        # Probed as the loop will train: logits at the answer's positions, in chunks, unless
        # Liger's fused cross-entropy takes the sft loss (see train_loop).
        split = split_head(model) if objective.uses_teacher or not plan.fused_kernels else None
        best, _ = autotune(
            model,
            length,
            budget,
            batches,
            fractions,
            objective=objective if objective.uses_teacher or split else None,
            teacher_k=max_k(train_examples) if objective.uses_teacher else 0,
            split=split,
        )
        if best is not None:
            plan.batch_size = best.batch_size
            plan.checkpoint_fraction = best.checkpoint_fraction
            plan.tuned = True
        # Each GPU tuned itself; they must agree, or their step counts (and DDP) part ways.
        plan.batch_size, plan.checkpoint_fraction, plan.tuned = from_main(
            (plan.batch_size, plan.checkpoint_fraction, plan.tuned)
        )
    checkpointed = set_checkpointing(model, plan.checkpoint_fraction)
    # After the autotuner: its probes change the batch size, each a compile of its own.
    compiled = compile_layers(model) if plan.compiled else 0
    log.info(
        "device plan: %s (%d layers checkpointed, %d compiled)",
        plan.as_dict(),
        checkpointed,
        compiled,
    )

    pad = tokenizer.pad_token_id
    on_policy = None
    if args.on_policy and teacher is not None:
        teacher_model, _, source = load_teacher(
            args.teacher_model or "", plan.device, plan.dtype, None, args.hf_token
        )
        on_policy = OnPolicy(
            teacher_model,
            args.on_policy,
            k=max_k(train_examples) or 20,
            pad_id=pad,
            stop_ids=stop_ids(tokenizer),
            max_new_tokens=args.on_policy_max_new_tokens,
            temperature=args.on_policy_temperature,
            seed=args.seed,
        )
        teacher["on_policy_teacher"] = source
    before = answer_perplexity(model, heldout_examples, pad)
    kl_before = _kl(model, train_examples, heldout_examples, pad) if teacher else {}
    metrics = train_loop(model, tokenizer, args, plan, train_examples, objective, on_policy)
    if on_policy is not None and teacher is not None:
        teacher["on_policy"] = on_policy.record()
        del on_policy, teacher_model
    after = answer_perplexity(model, heldout_examples, pad)
    log.info("held-out answer perplexity: %.3f before, %.3f after", before or 0, after or 0)
    if teacher:
        kl_after = _kl(model, train_examples, heldout_examples, pad)
        teacher["kl_to_teacher"] = {
            f"{part}_{when}": value
            for when, values in (("before", kl_before), ("after", kl_after))
            for part, value in values.items()
        }
        log.info("KL to the teacher's targets: %s", teacher["kl_to_teacher"])

    adapter_dir = args.output / "adapter"
    model_dir = args.output / "model"
    if not here.main:
        del model
        finish()  # waits for rank 0 to write the run directory
        return summary(json.loads((args.output / "training_record.json").read_text()))
    model.save_pretrained(adapter_dir)
    del model
    if cuda:
        torch.cuda.empty_cache()
    merge = merge_adapter(
        base_path, adapter_dir, model_dir, args.method, args.save_dtype, heldout_examples
    )
    save_tokenizer(tokenizer, base_path, model_dir)

    record: dict[str, Any] = {
        "stage": "train",
        "config": describe(args),
        "versions": versions(),
        "base": base_info,
        "data": data_record(args.data, records),
        "train_data": train_stats,
        "heldout_data": heldout_stats,
        "device": plan.as_dict(),
        "loss": {
            "loss": args.loss,
            **(
                {
                    "kd_temperature": args.kd_temperature,
                    "kd_weight": args.kd_weight if args.loss == "mix" else 1.0,
                    "teacher_target_share": train_stats["teacher_target_share"],
                    **(teacher or {}),
                }
                if teacher is not None
                else {}
            ),
        },
        "trainable_parameters": trainable,
        "total_parameters": total,
        "metrics": {
            **metrics,
            "heldout_perplexity_before": before,
            "heldout_perplexity_after": after,
        },
        "merge": merge,
        "outputs": {"model": str(model_dir), "adapter": str(adapter_dir)},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(args.output / "training_record.json", record)
    write_model_card(model_dir, record)
    finish()  # the other processes read the record once rank 0 is through
    return summary(record)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The one JSON line ``distill train`` prints, from the run record."""
    metrics = record["metrics"]
    return {
        "model": record["outputs"]["model"],
        "run_dir": record["config"]["output"],
        "method": record["config"]["method"],
        "loss": record["config"]["loss"],
        "steps": metrics["steps"],
        "train_loss": metrics["train_loss"],
        "tokens_per_second": metrics["tokens_per_second"],
        "heldout_perplexity_before": metrics["heldout_perplexity_before"],
        "heldout_perplexity_after": metrics["heldout_perplexity_after"],
        "merge_max_abs_diff": record["merge"]["max_abs_logit_diff"],
        "device": record["device"]["device"],
        "processes": record["device"]["processes"],
        "wall_seconds": record["wall_seconds"],
    }


def _check_teacher(args: TrainArgs, records: list[Any]) -> dict[str, Any]:
    """Before anything is written: rows with targets, one teacher, the student's vocabulary."""
    from transformers import AutoTokenizer

    from distill.logprobs import vocab_hash
    from distill.models import resolve_model

    rows = check_rows(records, args.loss)
    if rows.without:
        log.warning(
            "--loss mix: %d row(s) without teacher_logprobs train on cross-entropy alone",
            len(rows.without),
        )
    path, _ = resolve_model(args.base_model, revision=args.revision, token=args.hf_token)
    student = check_vocabulary(
        rows.vocab_hash, AutoTokenizer.from_pretrained(path), args.base_model or str(path)
    )
    if args.on_policy and args.teacher_model:
        teacher_path, _ = resolve_model(args.teacher_model, token=args.hf_token)
        scorer = vocab_hash(AutoTokenizer.from_pretrained(teacher_path))
        if scorer != student:
            raise TrainError(
                f"--teacher-model {args.teacher_model}: its vocabulary ({scorer}) is not the "
                f"student's ({student}); scoring the student's samples needs the same token ids"
            )
    return {
        "teacher_vocab_hash": rows.vocab_hash,
        "student_vocab_hash": student,
        "rows_with_targets": rows.with_targets,
        "rows_without_targets": len(rows.without),
    }


# Training sequences whose KL is measured before and after: enough to see the trend, cheap.
KL_SAMPLE = 64


def _kl(
    model: Any, train: list[Example], heldout: list[Example], pad_id: int
) -> dict[str, float | None]:
    """Mean KL(teacher || student) at T = 1 on the first training sequences and the held out."""
    collate = Collator(pad_id, packed=False, teacher=True)

    def batches(examples: list[Example]) -> list[dict[str, Any]]:
        chosen = [e for e in examples if getattr(e, "teacher", None) is not None]
        return [collate(chosen[i : i + 4]) for i in range(0, len(chosen), 4)]

    return {
        "train": teacher_kl(model, batches(train[:KL_SAMPLE])),
        "heldout": teacher_kl(model, batches(heldout)),
    }
