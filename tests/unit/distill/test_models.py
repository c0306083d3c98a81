"""Model resolution: local directories, hub ids through the real snapshot_download, embedded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distill import models
from distill.models import ModelError, cpu_has_native_bf16


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding ``pidistill/tiny`` at two revisions, the hub itself offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--pidistill--tiny"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        shutil.copytree(tiny_model, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_resolves_through_snapshot_download(hub_cache: Path) -> None:
    path, source = models.resolve_model("pidistill/tiny")
    assert path == hub_cache / "models--pidistill--tiny" / "snapshots" / ("a" * 40)
    assert source == {"name": "pidistill/tiny", "revision": "a" * 40, "source": "hub"}


def test_a_hub_revision_picks_that_snapshot(hub_cache: Path) -> None:
    path, source = models.resolve_model("pidistill/tiny", revision="v1", token="hf_x")
    assert path.name == "b" * 40
    assert source["revision"] == "v1"
    assert "hf_x" not in str(source)


def test_an_unknown_hub_id_offline_says_what_to_do(hub_cache: Path) -> None:
    with pytest.raises(ModelError, match=r"not in the local hub cache.*pass a local directory"):
        models.resolve_model("pidistill/absent")


def test_a_local_directory_is_used_as_it_is(tiny_model: Path) -> None:
    path, source = models.resolve_model(str(tiny_model))
    assert path == tiny_model and source["source"] == "local"


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model directory"):
        models.resolve_model(str(tmp_path))


def test_a_missing_path_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model directory"):
        models.resolve_model(str(tmp_path / "absent"))


def test_the_tiny_model_is_small_and_speaks_sentencepiece(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert 100_000 < model.num_parameters() < 1_000_000
    assert (tiny_model / "tokenizer.model").is_file()
    text = "Y fait frette icitte, pis le char part pas."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text


def test_the_embedded_encoder_is_minilm() -> None:
    import json

    path = models.embedded_encoder()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384
    assert (path / "1_Pooling" / "config.json").is_file()


@pytest.mark.slow
def test_the_embedded_teacher_converts_once_and_generates(tmp_path, monkeypatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.embedded_teacher()
    assert (path / "model.safetensors").is_file()
    assert models.embedded_teacher() == path  # cached: the second call converts nothing
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


CPUINFO = {
    "x86 with AVX512-BF16": ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),
    "x86 with AMX": ("flags\t\t: fpu avx2 amx_bf16 amx_tile\n", True),
    "x86 with AVX2 only": ("flags\t\t: fpu sse2 avx2 fma\n", False),
    "Pi 5 (Cortex-A76)": ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n", False),
    "Arm with BF16": ("Features\t: fp asimd bf16 i8mm sve\n", True),
    "no flags at all": ("processor\t: 0\n", False),
}


@pytest.mark.parametrize(("text", "native"), CPUINFO.values(), ids=CPUINFO.keys())
def test_native_bf16_is_read_from_cpuinfo(tmp_path: Path, text: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + text)
    assert cpu_has_native_bf16(cpuinfo) is native


def test_an_unreadable_cpuinfo_means_no_bf16(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(tmp_path / "missing") is False


ISA_CAPS = [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("ALL", True),
            ("", True)]  # fmt: skip


@pytest.mark.parametrize(("cap", "native"), ISA_CAPS)
def test_a_onednn_isa_cap_below_bf16_means_no_bf16(tmp_path: Path, cap: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\n" + CPUINFO["x86 with AVX512-BF16"][0])
    assert cpu_has_native_bf16(cpuinfo, {"ONEDNN_MAX_CPU_ISA": cap}) is native
