"""``distill export`` arguments and helpers that need no llama.cpp (integration runs the tools)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.export import ExportArgs, copy_tokenizer_assets, gguf_name, model_kind, write_sha256


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"quant": ["Q9_9"]}, "unknown type"),
        ({"quant": []}, "at least one"),
        ({"quant": ["Q8_0", "q8_0"]}, "twice"),
        ({"quant": ["IQ2_XXS"]}, "needs --imatrix-data"),
        ({"name": "../evil"}, "name"),
        ({"threads": 0}, "threads"),
        ({"token_embedding_type": "q9"}, "token_embedding_type: unknown type 'q9'"),
        ({"output_tensor_type": "Q8_0 "}, "output_tensor_type"),
    ],
    ids=["unknown quant", "no quant", "same quant twice", "iq2 without imatrix", "path in name",
         "zero threads", "unknown embedding type", "padded output type"],
)  # fmt: skip
def test_bad_arguments_fail_at_parse_time(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExportArgs(model="m", output_dir=Path("d"), **overrides)


def test_tensor_types_are_case_insensitive() -> None:
    args = ExportArgs(model="m", output_dir=Path("d"), token_embedding_type="F16")
    assert args.token_embedding_type == "f16" and args.output_tensor_type is None


def test_quant_names_are_case_insensitive() -> None:
    assert ExportArgs(model="m", output_dir=Path("d"), quant=["q4_k_m"]).quant == ["Q4_K_M"]
    assert gguf_name("student", "Q4_K_M") == "student-Q4_K_M.gguf"


def test_the_token_is_redacted_and_kept_off_the_command_line() -> None:
    from distill.argspec import describe, to_argv

    args = ExportArgs(model="org/model", output_dir=Path("d"), hf_token="hf_secret")
    assert describe(args)["hf_token"] == "***"
    argv, env = to_argv(args)
    assert "hf_secret" not in " ".join(argv) and env == {"HF_TOKEN": "hf_secret"}


def test_encoders_and_decoders_are_told_apart(tmp_path: Path, tiny_model: Path) -> None:
    from distill.models import embedded_encoder

    assert model_kind(tiny_model) == "decoder"
    assert model_kind(embedded_encoder()) == "encoder"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert model_kind(tmp_path) == "encoder"


def test_tokenizer_files_and_module_folders_are_copied(tmp_path: Path) -> None:
    from distill.models import embedded_encoder

    copied = copy_tokenizer_assets(embedded_encoder(), tmp_path / "assets")
    assert "vocab.txt" in copied and "1_Pooling/" in copied
    assert (tmp_path / "assets" / "1_Pooling" / "config.json").is_file()
    assert not (tmp_path / "assets" / "model.safetensors").exists()


def test_checksum_file_reads_like_sha256sum(tmp_path: Path) -> None:
    import hashlib

    target = tmp_path / "m-Q8_0.gguf"
    target.write_bytes(b"GGUF")
    digest = write_sha256(target)
    assert digest == hashlib.sha256(b"GGUF").hexdigest()
    assert (tmp_path / "m-Q8_0.gguf.sha256").read_text() == f"{digest}  m-Q8_0.gguf\n"


def test_a_missing_model_directory_is_bad_input(tmp_path: Path, monkeypatch) -> None:
    from distill import export
    from distill.models import ModelError

    monkeypatch.setattr("distill.llamacpp.require_tools", lambda: None)
    with pytest.raises(ModelError, match="no such model directory"):
        export.run(ExportArgs(model=str(tmp_path / "nope"), output_dir=tmp_path / "d"))
