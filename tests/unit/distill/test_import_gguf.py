"""``distill import-gguf``: a GGUF made here (gguf-py's own writer) becomes an export folder;
bad files stop with one line and leave nothing behind; URLs resume; hub ids go through the hub
cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from distill import cli, import_gguf
from distill.import_gguf import GgufError, ImportGgufArgs, read_gguf

Q8_0 = 7  # llama.cpp's LlamaFileType.MOSTLY_Q8_0


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    file_type: int | None = Q8_0,
    tokenizer: bool = True,
    name: str = "Tiny Test",
) -> Path:
    """A small, real GGUF: metadata as llama.cpp's converter writes it and two tensors."""
    gguf = import_gguf.gguf_module()
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    if file_type is not None:
        writer.add_file_type(file_type)
    if tokenizer:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
        writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", np.ones((5, 4096), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return write_gguf(tmp_path / "src" / "tiny-test.Q8_0.gguf")


def test_a_gguf_becomes_an_export_folder_model_sync_takes(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist" / "tiny"
    summary = import_gguf.run(ImportGgufArgs(gguf=str(tiny), output_dir=out))
    assert summary["files"] == ["tiny-test-Q8_0.gguf"]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "tiny-test-Q8_0.gguf",
        "tiny-test-Q8_0.gguf.sha256",
    ]
    gguf = out / "tiny-test-Q8_0.gguf"
    digest = hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert gguf.read_bytes() == tiny.read_bytes()
    # What roles/model_sync/tasks/preflight.yml reads: name, files[].quant/file/sha256, sidecar.
    assert (out / "tiny-test-Q8_0.gguf.sha256").read_text() == f"{digest}  {gguf.name}\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "tiny-test" and manifest["kind"] == "decoder"
    assert manifest["files"] == [
        {"quant": "Q8_0", "file": gguf.name, "bytes": tiny.stat().st_size, "sha256": digest}
    ]
    header = manifest["gguf"]
    assert (header["architecture"], header["context_length"], header["file_type"]) == (
        "llama",
        256,
        Q8_0,
    )
    assert header["tokenizer"]["model"] == "llama" and header["tokenizer"]["tokens"] == 5
    assert header["tokenizer"]["chat_template"] and header["general_name"] == "Tiny Test"
    assert manifest["source"]["source"] == "imported: file"
    # Same fields as distill export's manifest, so eval and the card read it too.
    assert {"outtype", "tensor_types", "llama_cpp", "imatrix", "tokenizer_dir"} <= set(manifest)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".import-")]


def test_the_cli_takes_the_seeds_spelling_and_prints_a_summary(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = cli.main(["import-gguf", "--gguf", str(tiny), "--output_dir", str(out), "--name", "t"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quant"] == "Q8_0" and summary["context_length"] == 256
    assert (out / "t-Q8_0.gguf").is_file()


def test_without_a_file_type_the_quant_is_the_type_of_most_bytes(tmp_path: Path) -> None:
    info = read_gguf(write_gguf(tmp_path / "f.gguf", file_type=None))
    assert (info["quant"], info["quant_guessed"]) == ("F16", True)


def test_an_encoder_architecture_is_an_encoder(tmp_path: Path) -> None:
    assert read_gguf(write_gguf(tmp_path / "e.gguf", arch="bert"))["kind"] == "encoder"


@dataclass(frozen=True)
class Bad:
    make: str
    message: str


def _make(kind: str, tmp_path: Path, tiny: Path) -> Path:
    path = tmp_path / "bad.gguf"
    data = tiny.read_bytes()
    if kind == "json":
        path.write_text('{"id": "r1", "user": "Allô"}\n')
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "cut in the tensors":
        path.write_bytes(data[: len(data) - 1000])
    elif kind == "cut in the header":
        path.write_bytes(data[:40])
    elif kind == "no tokenizer":
        write_gguf(path, tokenizer=False)
    elif kind == "missing":
        pass
    elif kind == "a directory":
        path.mkdir()
    return path


BAD = {
    "not a GGUF": Bad("json", "not a GGUF file (it starts with b'{\"id'"),
    "an empty file": Bad("empty", "not a GGUF file"),
    "truncated in its tensors": Bad("cut in the tensors", "truncated: "),
    "truncated in its header": Bad("cut in the header", "unreadable GGUF header"),
    "no tokenizer": Bad("no tokenizer", "no tokenizer (tokenizer.ggml.model"),
    "no such file": Bad("missing", "no such file"),
    "a directory": Bad("a directory", "a directory, not a GGUF file"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_a_bad_gguf_is_one_line_exit_2_and_nothing_written(
    case: Bad, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _make(case.make, tmp_path, tiny)
    parent = tmp_path / "dist"
    parent.mkdir()
    code = cli.main(["import-gguf", "--gguf", str(source), "--output-dir", str(parent / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"distill import-gguf: error: {source}: {case.message}"] or (
        len(err) == 1 and err[0].startswith(f"distill import-gguf: error: {source}: ")
    ), err
    assert case.message in err[0]
    assert list(parent.iterdir()) == []


def test_an_existing_gguf_is_kept_unless_overwrite(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    import_gguf.run(ImportGgufArgs(gguf=str(tiny), output_dir=out))
    with pytest.raises(GgufError, match="already there"):
        import_gguf.run(ImportGgufArgs(gguf=str(tiny), output_dir=out))
    other = write_gguf(tmp_path / "tiny-test.Q8_0.gguf", name="Other")
    import_gguf.run(ImportGgufArgs(gguf=str(other), output_dir=out, overwrite=True))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["gguf"]["general_name"] == "Other"
    assert manifest["files"][0]["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    assert not [p for p in out.iterdir() if p.name.startswith(".import-")]


def test_a_folder_of_another_model_is_refused(tiny: Path, tmp_path: Path) -> None:
    from distill.export import ExportError

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "student"}))
    with pytest.raises(ExportError, match="describes model 'student'"):
        import_gguf.run(ImportGgufArgs(gguf=str(tiny), output_dir=out))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_bad_arguments_fail_when_parsed() -> None:
    with pytest.raises(ValueError, match="hub_file: only with a hub id"):
        ImportGgufArgs(gguf="model.gguf", output_dir=Path("d"), hub_file="*.gguf")
    with pytest.raises(ValueError, match="name: letters"):
        ImportGgufArgs(gguf="model.gguf", output_dir=Path("d"), name="a b")


# ----------------------------------------------------------------------------- URLs


class _Server(http.server.ThreadingHTTPServer):
    body: bytes
    ranges: bool
    requests: list[str | None]
    stop_after: int | None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        body, wanted = self.server.body, self.headers.get("Range")
        self.server.requests.append(wanted)
        if self.path != "/models/tiny-test.Q8_0.gguf":
            self.send_error(404)
            return
        start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
        partial = self.server.ranges and start > 0
        chunk = body[start:] if partial else body
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        stop = self.server.stop_after
        if stop is not None:  # a connection that drops mid-way
            self.server.stop_after = None
            self.wfile.write(chunk[:stop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tiny: Path) -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.body, httpd.ranges, httpd.requests, httpd.stop_after = tiny.read_bytes(), True, [], None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _url(server: _Server, path: str = "/models/tiny-test.Q8_0.gguf") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PIDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "downloads"


def test_a_url_is_downloaded_and_imported(
    server: _Server, cache: Path, tmp_path: Path, tiny: Path
) -> None:
    out = tmp_path / "out"
    summary = import_gguf.run(ImportGgufArgs(gguf=_url(server), output_dir=out))
    assert (out / summary["files"][0]).read_bytes() == tiny.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["source"] == "imported: url"
    assert list(cache.iterdir()) == []  # the download moved into the export folder


@pytest.mark.parametrize(("ranges", "resumed"), [(True, True), (False, False)])
def test_a_dropped_download_resumes_where_the_server_allows(
    server: _Server, cache: Path, tiny: Path, ranges: bool, resumed: bool
) -> None:
    server.ranges, server.stop_after = ranges, 30_000
    with pytest.raises(import_gguf.FetchError, match="run again"):
        import_gguf.download(_url(server), cache)
    (part,) = cache.glob("*.part")
    assert part.stat().st_size == 30_000
    done = import_gguf.download(_url(server), cache)
    assert done.read_bytes() == tiny.read_bytes()
    assert server.requests == [None, "bytes=30000-"]
    assert not list(cache.glob("*.part"))
    assert resumed == ranges


def test_a_url_that_is_not_there_is_one_line(
    server: _Server, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(server, "/models/nope.gguf")
    code = cli.main(["import-gguf", "--gguf", url, "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"distill import-gguf: error: {url}: HTTP 404 " + (
        "Not Found"
    )
    assert not (tmp_path / "out").exists()


def test_a_downloaded_file_that_is_not_a_gguf_is_not_kept(
    server: _Server, cache: Path, tmp_path: Path
) -> None:
    server.body = b"<html>login first</html>"
    with pytest.raises(GgufError, match="not a GGUF file"):
        import_gguf.run(ImportGgufArgs(gguf=_url(server), output_dir=tmp_path / "out"))
    assert list(cache.iterdir()) == [] and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- hub ids


@pytest.fixture
def hub_cache(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding ``pidistill/tiny-gguf`` (two quants) at two revisions, hub offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--pidistill--tiny-gguf"
    for ref, commit, name in (("main", "a" * 40, "Main"), ("v1", "b" * 40, "Version one")):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        write_gguf(snapshot / "tiny-test.Q8_0.gguf", name=name)
        shutil.copy(snapshot / "tiny-test.Q8_0.gguf", snapshot / "tiny-test.F16.gguf")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_with_a_revision_and_a_file_pattern(hub_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ImportGgufArgs(
        gguf="pidistill/tiny-gguf", hub_file="*Q8_0.gguf", revision="v1", output_dir=out
    )
    import_gguf.run(args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {
        "name": "pidistill/tiny-gguf",
        "revision": "b" * 40,
        "source": "imported: hub",
        "file": "tiny-test.Q8_0.gguf",
        "model": "pidistill/tiny-gguf",
    }
    assert manifest["gguf"]["general_name"] == "Version one"


def test_a_hub_repository_of_several_ggufs_needs_hub_file(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(GgufError, match=r"matches tiny-test.F16.gguf, tiny-test.Q8_0.gguf"):
        import_gguf.run(ImportGgufArgs(gguf="pidistill/tiny-gguf", output_dir=tmp_path / "o"))
    assert not (tmp_path / "o").exists()
