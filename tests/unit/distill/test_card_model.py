"""The model card's eval tables and the demo's summary, rendered from an ``eval.json``."""

from __future__ import annotations

import json
from pathlib import Path

from distill.card_model import eval_table, render_card
from distill.demo import _eval_table


def evaluation() -> dict:
    """An eval.json of the shape ``distill eval`` writes (numbers made up, all distinct)."""
    quant = {"file": "s-Q8_0.gguf", "mib": 138.1, "mean_kld": 0.0123, "same_top_p": 91.5,
             "ppl_ratio": 1.011, "goal": {"met": False}}  # fmt: skip
    small = {"file": "s-Q4_K_M.gguf", "mib": 100.2, "mean_kld": 0.21, "same_top_p": 70.25,
             "ppl_ratio": 1.3, "goal": {"met": True}}  # fmt: skip
    return {
        "heldout": {"rows": 25, "answer_tokens": 2900, "json_rows": 6},
        "teacher": {
            "model": "embedded:smollm2-135m-instruct",
            "answer_perplexity": 1.9,
            "json": {"rows": 6, "json_valid": 1.0, "schema_valid": 0.8333},
        },
        "student_vs_teacher": {
            "before": {
                "answer_perplexity": 4100.0,
                "top1_agreement": 0.12,
                "mean_kl": 5.5,
                "chrf": 3.25,
                "exact_match": 0.0,
                "json": {
                    "free": {"json_valid": 0.0, "schema_valid": 0.0},
                    "constrained": {"json_valid": 1.0, "schema_valid": 0.5},
                },
            },
            "after": {
                "answer_perplexity": 23.0,
                "top1_agreement": 0.615,
                "mean_kl": 0.83,
                "chrf": 31.75,
                "exact_match": 0.04,
                "json": {
                    "free": {"json_valid": 0.5, "schema_valid": 0.3333},
                    "constrained": {"json_valid": 1.0, "schema_valid": 0.6667},
                },
            },
        },
        "gguf": {
            "base": {"type": "F16"},
            "text_tokens": 5632,
            "ctx": 256,
            "quants": {"Q8_0": quant, "Q4_K_M": small},
        },
        "teacher_ceiling": {
            "quants": {
                "Q8_0": {"mean_kld": 0.0072, "same_top_p": 93.2, "ppl_ratio": 1.0076},
                "Q4_K_M": {"mean_kld": 0.25, "same_top_p": 68.0, "ppl_ratio": 1.4},
            }
        },
        "goal": {"quant": "Q8_0", "rule": "no worse than the teacher's own Q8_0", "met": False},
    }


def test_the_card_puts_teacher_before_and_after_side_by_side() -> None:
    table = eval_table(evaluation())
    assert "Held-out rows: 25 (2900 answer tokens), against the teacher `embedded:" in table
    assert "| perplexity of the teacher's answers | 1.9 | 4100 | 23 | after below before |" in table
    assert "| next-token top-1 agreement with the teacher |  | 12.0% | 61.5% |  |" in table
    assert "| mean KL(teacher ‖ student), nats/token |  | 5.5 | 0.83 |  |" in table
    assert "| chrF of greedy answers vs the teacher's |  | 3.2 | 31.8 |  |" in table
    assert "| schema-valid rate, free (6 rows) | 83.3% | 0.0% | 33.3% |  |" in table
    assert "| schema-valid rate, schema-constrained (6 rows) |  | 50.0% | 66.7% |  |" in table


def test_the_card_sets_each_quant_beside_the_teachers_own() -> None:
    table = eval_table(evaluation())
    assert "against the unquantized F16 GGUF" in table and "5632 tokens, chunks of 256" in table
    assert "Goal: no worse than the teacher's own Q8_0." in table
    assert (
        "| s-Q8_0.gguf | 138.1 | 0.0123 | 91.50% | 1.0110 | 0.0072 | 93.20% | 1.0076 | "
        "**not met** |" in table
    )
    assert (
        "| s-Q4_K_M.gguf | 100.2 | 0.21 | 70.25% | 1.3000 | 0.25 | 68.00% | 1.4000 | met |" in table
    )
    card = render_card({"config": {"method": "lora"}, "versions": {"torch": "2"}}, evaluation())
    assert card.startswith("---\n") and "| torch | 2 |" in card and table.strip() in card
    assert "Not evaluated yet" in eval_table(None)


def test_without_gguf_files_the_card_has_no_gguf_table() -> None:
    data = evaluation()
    del data["gguf"], data["teacher_ceiling"], data["goal"]
    table = eval_table(data)
    assert "GGUF" not in table and "| exact match with the teacher's answers |" in table


def test_the_demo_summary_prints_the_same_numbers(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(evaluation()))
    table = _eval_table(path)
    assert "| top-1 agreement with the teacher |  | 0.12 | 0.615 |" in table
    assert "| held-out answer perplexity | 1.9 | 4100.0 | 23.0 |" in table
    assert "| schema-valid JSON, constrained |  | 0.5 | 0.6667 |" in table
    assert "| Q8_0 | 138.1 | 0.0123 | 91.5 | 1.011 | 0.0072 / 93.2 | not met |" in table
    assert "| Q4_K_M | 100.2 | 0.21 | 70.25 | 1.3 | 0.25 / 68.0 | met |" in table


def header(card: str):
    from huggingface_hub import ModelCard

    return ModelCard(card).data


def test_the_embedded_teacher_is_named_by_its_hub_id_with_license_and_eval_results() -> None:
    record = {
        "config": {"method": "dora"},
        "base": {"base": {"name": "embedded:smollm2-135m-instruct", "revision": "gguf-sha256:x"}},
        "data": [{"path": "l.jsonl", "sha256": "0" * 64, "rows": 3, "train": 2, "heldout": 1,
                  "conversations": 1}],
    }  # fmt: skip
    card = render_card(record, evaluation())
    data = header(card)
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.license == "apache-2.0" and "dora" in data.tags
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results["perplexity of the teacher's answers"] == 23.0
    assert results["mean KL(teacher || student), nats/token"] == 0.83
    assert results["Q8_0 GGUF mean KLD vs the unquantized GGUF"] == 0.0123
    assert {r.dataset_split for r in data.eval_results} == {"heldout"}
    assert "| l.jsonl | `0000000000000000…` | 3 | 2 | 1 | 1 |" in card
    # Before eval: no results, still a valid header.
    assert header(render_card(record)).eval_results is None


def test_a_hub_base_keeps_its_id_and_the_license_of_its_cached_card(
    tmp_path: Path, monkeypatch
) -> None:
    # A real hub cache layout (what snapshot_download leaves), made by hand: no hub here.
    repo = tmp_path / "hub" / "models--org--tiny-chat"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    source = {"name": "org/tiny-chat", "revision": "main", "source": "hub"}
    data = header(render_card({"base": {"base": source}}))
    assert (data.base_model, data.license) == ("org/tiny-chat", "mit")
    # A local directory that does not say where it came from has no hub id.
    local = {"name": str(tmp_path), "revision": None, "source": "local"}
    data = header(render_card({"base": {"base": local}}))
    assert data.base_model is None and data.license == "unknown"
