"""``make release``'s packing: one deterministic tarball with checksums that verify, a damaged
export refused, two exports compared by their GGUFs' hashes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from distill import import_gguf, release
from distill.import_gguf import ImportGgufArgs

HOST = {"machine": "x86_64", "cpu": "test", "cpus": 2}


def _gguf(path: Path, fill: float = 1.0) -> Path:
    gguf = import_gguf.gguf_module()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_file_type(1)  # MOSTLY_F16
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_tensor("token_embd.weight", np.full((4, 256), fill, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_run(root: Path, fill: float = 1.0) -> Path:
    """A run directory as ``make release``'s stages leave it: dist/, the model card, eval.json."""
    run = root / "run"
    (root / "src").mkdir(parents=True)
    source = _gguf(root / "src" / "student.F16.gguf", fill)
    import_gguf.run(ImportGgufArgs(gguf=str(source), output_dir=run / "dist"))
    (run / "train" / "model").mkdir(parents=True)
    (run / "train" / "model" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# student\n")
    (run / "train" / "eval.json").write_text(json.dumps({"goal": {"met": True}}) + "\n")
    (run / "DATASET_CARD.md").write_text("# data\n")
    return run


def test_the_tarball_holds_the_release_and_its_checksums_verify(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    summary = release.pack(run, tmp_path / "dist", commit="abc123", host=HOST)
    tarball = Path(summary["tarball"])
    assert tarball.name == "pidistill-student-abc123.tar.gz"
    sidecar = tarball.with_name(tarball.name + ".sha256")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert sidecar.read_text() == f"{digest}  {tarball.name}\n" and summary["sha256"] == digest
    unpacked = tmp_path / "unpacked"
    with tarfile.open(tarball) as tar:
        tar.extractall(unpacked, filter="data")
    folder = unpacked / "pidistill-student-abc123"
    assert sorted(p.name for p in folder.iterdir()) == [
        "DATASET_CARD.md",
        "MODEL_CARD.md",
        "SHA256SUMS",
        "eval.json",
        "manifest.json",
        "release.json",
        "student-F16.gguf",
        "student-F16.gguf.sha256",
    ]
    # sha256sum itself checks every file, and the GGUF's own sidecar.
    for sums in ("SHA256SUMS", "student-F16.gguf.sha256"):
        done = subprocess.run(["sha256sum", "-c", sums], cwd=folder, capture_output=True)
        assert done.returncode == 0, done.stdout
    record = json.loads((folder / "release.json").read_text())
    manifest = json.loads((run / "dist" / "manifest.json").read_text())
    assert record["gguf_sha256"] == {"student-F16.gguf": manifest["files"][0]["sha256"]}
    assert record["commit"] == "abc123" and record["built_on"] == HOST


def test_the_same_files_give_the_same_tarball(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    first = release.pack(run, tmp_path / "a", commit="c", host=HOST)
    (run / "train" / "eval.json").touch()  # a newer mtime must not change the bytes
    second = release.pack(run, tmp_path / "b", commit="c", host=HOST)
    assert first["sha256"] == second["sha256"]
    assert Path(first["tarball"]).read_bytes() == Path(second["tarball"]).read_bytes()


def test_a_damaged_export_is_refused_and_nothing_written(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    gguf = run / "dist" / "student-F16.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\x01")
    out = tmp_path / "dist"
    with pytest.raises(release.ReleaseError, match=r"student-F16.gguf: sha256 .* damaged"):
        release.pack(run, out, commit="c", host=HOST)
    assert not out.exists()


def test_a_missing_eval_names_the_file(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path)
    (run / "train" / "eval.json").unlink()
    code = release.main(["--run-dir", str(run), "--out", str(tmp_path / "dist")])
    assert code == 2
    assert f"{run / 'train' / 'eval.json'}: missing" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()


def test_two_exports_compare_by_their_ggufs(tmp_path: Path, capsys) -> None:
    same_a, same_b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    other = make_run(tmp_path / "c", fill=2.0)
    manifests = [r / "dist" / "manifest.json" for r in (same_a, same_b, other)]
    # Different times and paths in the manifests; the same GGUF bytes.
    assert release.compare(manifests[0], manifests[1]) == []
    assert release.main(["--compare", str(manifests[0]), str(manifests[2])]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["same"] is False and out["differences"][0].startswith("F16: student-F16.gguf ")
