"""``distill train`` on the tiny model on the CPU: data, LoRA, DoRA, QLoRA, merge, resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distill import train as train_stage
from distill.encoding import IGNORE_INDEX, DataError, encode_record, row_style
from distill.records import read_records, render_prompt
from distill.train import TrainArgs, TrainError
from distill.train.data import Collator, pack
from distill.train.model import keep_layer_indices

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def labelled(path: Path, n: int = 12, heldout_every: int = 4, answered: bool = True) -> Path:
    """Small labelled rows: every ``heldout_every``-th held out, every third needs JSON."""
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            needs_json = i % 3 == 0
            row = {
                "id": f"r{i:02d}",
                "system_hint": "Réponds en québécois.",
                "user": "Salut! " + "Comment ça va? " * (i % 3 + 1),
                "requires_json": needs_json,
                "json_schema": SCHEMA if needs_json else None,
                "split": "heldout" if heldout_every and i % heldout_every == heldout_every - 1
                else "train",
                "metadata": {
                    "register": "familier",
                    "dialect": "québécois",
                    "provenance": {"source": "test", "labeller": {"prompt_style": "chat"}},
                },
            }  # fmt: skip
            if answered:
                row["assistant"] = '{"ok": true}' if needs_json else "Ben correct, pis toi?"
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def args(data: Path, out: Path, base: Path, **overrides) -> TrainArgs:
    values = dict(
        data=[data],
        output=out,
        base_model=str(base),
        max_steps=2,
        batch_size=4,
        lora_rank=4,
        learning_rate=5e-3,
        logging_steps=1,
        max_length=256,
    )
    values.update(overrides)
    return TrainArgs(**values)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return labelled(tmp_path / "labelled.jsonl")


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return tok


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"batch_size": 0}, "batch_size"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite"),
        ({"target_modules": []}, "target_modules"),
        ({"device": "tpu"}, "device"),
    ],
    ids=["rank must be positive", "dropout below one", "batch positive", "resume xor overwrite",
         "some target modules", "known device"],
)  # fmt: skip
def test_bad_arguments_fail_at_parse_time(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        args(tmp_path / "x.jsonl", tmp_path / "out", tmp_path, **overrides)


def test_config_file_values_are_overridden_by_flags(tmp_path: Path) -> None:
    from distill.argspec import build_parser, parse_into

    config = tmp_path / "train.yaml"
    config.write_text("method: dora\nlora_rank: 8\nepochs: 2\n")
    parser = build_parser(TrainArgs)
    namespace = parser.parse_args(
        ["--config", str(config), "--data", "a.jsonl", "--output", "o", "--lora-rank", "4"]
    )
    parsed = parse_into(TrainArgs, namespace)
    assert (parsed.method, parsed.lora_rank, parsed.epochs) == ("dora", 4, 2.0)


def test_importing_the_stage_does_not_import_torch() -> None:
    import subprocess

    modules = "distill.train, distill.export, distill.evaluate, distill.bench_train"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- data


def test_rows_without_answers_are_all_listed(tmp_path: Path, tiny_model: Path) -> None:
    data = labelled(tmp_path / "l.jsonl", n=5, answered=False)
    with pytest.raises(DataError, match=r"5 row\(s\) have no assistant answer.*l.jsonl:1 \(r00\)"):
        train_stage.run(args(data, tmp_path / "out", tiny_model))
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_a_malformed_row_names_file_line_and_field(tmp_path: Path, tiny_model: Path) -> None:
    from distill.records import RecordError

    data = labelled(tmp_path / "l.jsonl", n=3)
    data.write_text(data.read_text() + '{"id": "x"}\n')
    with pytest.raises(RecordError, match=r"l.jsonl:4: user: missing required field"):
        train_stage.run(args(data, tmp_path / "out", tiny_model))


def test_sequence_is_the_prompt_then_the_answer_with_loss_on_the_answer(
    data: Path, tokenizer
) -> None:
    record = read_records(data)[1]
    example = encode_record(record, "chat", tokenizer, 256)
    assert example is not None
    prompt = render_prompt(record, "chat", tokenizer)
    masked = [i for i, label in enumerate(example.labels) if label == IGNORE_INDEX]
    prompt_len = len(masked)
    assert masked == list(range(prompt_len))  # the prompt only, nothing after it
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    text = tokenizer.decode(example.input_ids[:-1], skip_special_tokens=False)
    assert text.replace("<s> ", "").replace("<s>", "").endswith(record.assistant)
    assert tokenizer.decode(example.input_ids[:prompt_len]).replace("<s>", "").strip() == (
        tokenizer.decode(tokenizer(prompt)["input_ids"]).replace("<s>", "").strip()
    )


def test_long_answers_are_cut_and_too_long_prompts_dropped(data: Path, tokenizer) -> None:
    record = read_records(data)[1]
    full = encode_record(record, "chat", tokenizer, 256)
    assert full is not None
    prompt_len = sum(1 for x in full.labels if x == IGNORE_INDEX)
    cut = encode_record(record, "chat", tokenizer, prompt_len + 2)
    assert cut is not None and cut.truncated and len(cut.input_ids) == prompt_len + 2
    assert encode_record(record, "chat", tokenizer, prompt_len) is None


def test_plain_rows_use_the_plain_prompt(tmp_path: Path, tokenizer) -> None:
    path = labelled(tmp_path / "l.jsonl", n=2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["metadata"]["provenance"]["labeller"]["prompt_style"] = "plain"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(path)
    assert row_style(records[0], "auto", tokenizer) == "plain"
    assert row_style(records[1], "auto", tokenizer) == "chat"
    assert row_style(records[1], "plain", tokenizer) == "plain"


def test_packing_keeps_rows_whole_and_restarts_positions(data: Path, tokenizer) -> None:
    examples = [encode_record(r, "chat", tokenizer, 256) for r in read_records(data)]
    bins = pack([e for e in examples if e], 256)
    assert all(sum(len(e.input_ids) for e in b) <= 256 for b in bins)
    assert sum(len(b) for b in bins) == len(examples)
    batch = Collator(pad_id=0, packed=True)(bins[:2])
    assert "attention_mask" not in batch  # the block-diagonal mask comes from position_ids
    first = bins[0]
    starts = [0]
    for example in first[:-1]:
        starts.append(starts[-1] + len(example.input_ids))
    assert all(int(batch["position_ids"][0, s]) == 0 for s in starts)


def test_padding_never_carries_loss(data: Path, tokenizer) -> None:
    examples = [encode_record(r, "chat", tokenizer, 256) for r in read_records(data)[:3]]
    batch = Collator(pad_id=tokenizer.pad_token_id, packed=False)(examples)
    assert bool(((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE_INDEX)).all())


@pytest.mark.parametrize(
    ("total", "every", "kept"),
    [(30, 2, 15), (4, 2, 2), (5, 1, 5), (3, 5, 1)],
    ids=["half of thirty", "half of four", "every layer", "more than the layers"],
)
def test_layer_keeping_is_even_and_keeps_the_ends(total: int, every: int, kept: int) -> None:
    keep = keep_layer_indices(total, every)
    assert len(keep) == kept
    assert keep[-1] == total - 1
    if kept > 1:
        assert keep[0] == 0


def test_the_ends_pattern_drops_the_middle() -> None:
    assert keep_layer_indices(30, 2, "ends") == [*range(8), *range(23, 30)]
    assert keep_layer_indices(4, 2, "ends") == [0, 3]
    assert keep_layer_indices(5, 1, "ends") == list(range(5))


def test_an_unknown_layer_pattern_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="init_layers: one of even, ends, got 'middle'"):
        TrainArgs(data=[tmp_path / "d.jsonl"], output=tmp_path / "o", init_layers="middle")


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_each_method_trains_and_merges_on_the_cpu(
    method: str, data: Path, tmp_path: Path, tiny_model: Path
) -> None:
    out = tmp_path / "run"
    summary = train_stage.run(args(data, out, tiny_model, method=method, max_steps=3))
    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.model").is_file()  # llama.cpp's converter reads it
    assert (model_dir / "chat_template.jinja").is_file() or "chat_template" in (
        model_dir / "tokenizer_config.json"
    ).read_text()
    card = (model_dir / "README.md").read_text()
    assert f"| method | {method} |" in card and "## Versions" in card
    record = json.loads((out / "training_record.json").read_text())
    assert record["data"][0]["sha256"] and record["versions"]["peft"]
    assert record["config"]["method"] == method and record["device"]["device"] == "cpu"
    assert record["device"]["dtype"] == "float32"
    assert summary["steps"] == 3
    assert summary["merge_max_abs_diff"] < 1e-4
    assert summary["heldout_perplexity_after"] < summary["heldout_perplexity_before"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dtype"] == ("float16" if method == "qlora" else "float32")
    assert "quantization_config" not in config


@pytest.mark.slow
def test_compiled_layers_train_as_the_plain_ones(data: Path, tmp_path: Path, tiny_model: Path):
    """--compile on (auto: CUDA only) on the CPU: the same losses as without, a faithful merge."""
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        summary = train_stage.run(args(data, out, tiny_model, max_steps=3, compile=mode))
        record = json.loads((out / "training_record.json").read_text())
        assert record["device"]["compiled"] is (mode == "on")
        assert summary["merge_max_abs_diff"] < 1e-4
        runs[mode] = [entry["loss"] for entry in record["metrics"]["losses"]]
    assert len(runs["on"]) == 3
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-3)


@pytest.mark.slow
def test_merged_logits_equal_the_adapter_logits(data: Path, tmp_path: Path, tiny_model: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train_stage.run(args(data, out, tiny_model, method="dora", learning_rate=2e-2))
    ids = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
        adapter_logits = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
        merged_logits = merged(input_ids=ids).logits
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)  # training changed it
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resume_goes_on_from_the_last_checkpoint(data: Path, tmp_path: Path, tiny_model: Path):
    out = tmp_path / "run"
    train_stage.run(args(data, out, tiny_model, max_steps=2, save_steps=1))
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(TrainError, match="not empty"):
        train_stage.run(args(data, out, tiny_model, max_steps=3))
    with pytest.raises(TrainError, match="lora_rank"):
        train_stage.run(args(data, out, tiny_model, max_steps=3, resume=True, lora_rank=8))
    summary = train_stage.run(args(data, out, tiny_model, max_steps=3, save_steps=1, resume=True))
    record = json.loads((out / "training_record.json").read_text())
    assert summary["steps"] == 3
    assert record["metrics"]["resumed_from_step"] == 2


@pytest.mark.slow
def test_student_keeps_every_kth_layer_of_the_teacher(
    data: Path, tmp_path: Path, sample_files: tuple[Path, Path]
) -> None:
    from distill.models import make_tiny_llama
    from distill.records import read_many

    corpus = [r.user for r in read_many(sample_files)]
    teacher = make_tiny_llama(tmp_path / "teacher", corpus, layers=4)
    out = tmp_path / "run"
    train_stage.run(args(data, out, teacher, init_from_teacher_every=2, max_steps=1))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    record = json.loads((out / "training_record.json").read_text())
    assert record["base"]["layers_kept"] == [0, 3]
    assert "keeping one decoder layer in 2" in (out / "model" / "README.md").read_text()
