"""``make release``: one tarball of a model built on the embedded defaults, with its checksums.

    make release                                   # label, card, train, export, eval, then pack
    python -m distill.release --run-dir runs/release --out dist
    python -m distill.release --compare runs/a/dist/manifest.json runs/b/dist/manifest.json

``make release`` runs the demo's stages (``DEMO_FLEET_SIZE=0``: no lab) into ``runs/release``,
then :func:`pack` puts the export's GGUFs with their ``.sha256`` files, ``manifest.json``, the
model card (``MODEL_CARD.md``), ``eval.json`` and the dataset card into
``dist/pidistill-<name>-<commit>.tar.gz``, beside ``<tarball>.sha256``. Inside, ``SHA256SUMS``
checks every file (``sha256sum -c SHA256SUMS``) and ``release.json`` records the commit and the
machine. The tarball is deterministic: the same files give the same bytes (sorted members, fixed
times and owners, gzip without a timestamp). ``--compare`` tells whether two exports made the
same GGUFs, naming each file whose hash differs (exit 1 then).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class ReleaseError(ValueError):
    """A run directory that cannot be packed; the message names the missing or damaged file."""


def _sha256(path: Path) -> str:
    from distill.models import sha256_file

    return sha256_file(path)


def release_files(run_dir: Path) -> dict[str, Path]:
    """What goes into the tarball, by its name there; every GGUF checked against the manifest."""
    dist = run_dir / "dist"
    manifest_path = dist / "manifest.json"
    if not manifest_path.is_file():
        raise ReleaseError(f"{manifest_path}: missing (run distill export into {dist})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReleaseError(f"{manifest_path}: not JSON ({err.msg})") from None
    if not manifest.get("files"):
        raise ReleaseError(f"{manifest_path}: lists no GGUF file")
    files: dict[str, Path] = {"manifest.json": manifest_path}
    for entry in manifest["files"]:
        gguf = dist / entry["file"]
        sidecar = gguf.with_name(gguf.name + ".sha256")
        for path in (gguf, sidecar):
            if not path.is_file():
                raise ReleaseError(f"{path}: missing (listed in {manifest_path})")
        digest = _sha256(gguf)
        recorded = sidecar.read_text(encoding="utf-8").split()[:1]
        if digest != entry["sha256"] or recorded != [digest]:
            raise ReleaseError(
                f"{gguf}: sha256 {digest}, manifest {entry['sha256']}, .sha256 file "
                f"{recorded[0] if recorded else '(empty)'}: the export is damaged, export again"
            )
        files[gguf.name] = gguf
        files[sidecar.name] = sidecar
    for name, path in (
        ("MODEL_CARD.md", run_dir / "train" / "model" / "README.md"),
        ("eval.json", run_dir / "train" / "eval.json"),
    ):
        if not path.is_file():
            raise ReleaseError(f"{path}: missing (run distill train and distill eval first)")
        files[name] = path
    card = run_dir / "DATASET_CARD.md"
    if card.is_file():
        files["DATASET_CARD.md"] = card
    return files


def git_commit(root: Path = ROOT) -> str:
    """The short commit of the tree (``+dirty`` when it has changes), or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """What a rebuild's hashes depend on besides the commit (see the README's Release section)."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes | None = None, path: Path | None = None):
    info = tarfile.TarInfo(name)
    info.size = len(data) if data is not None else path.stat().st_size  # type: ignore[union-attr]
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    if data is not None:
        tar.addfile(info, io.BytesIO(data))
    else:
        with path.open("rb") as handle:  # type: ignore[union-attr]
            tar.addfile(info, handle)


def pack(
    run_dir: Path, out_dir: Path, *, commit: str | None = None, host: dict | None = None
) -> dict[str, Any]:
    """Write ``<out_dir>/pidistill-<name>-<commit>.tar.gz`` and its ``.sha256``; the summary."""
    files = release_files(run_dir)
    manifest = json.loads(files["manifest.json"].read_text(encoding="utf-8"))
    commit = commit or git_commit()
    stem = f"pidistill-{manifest['name']}-{commit}"
    sums = {name: _sha256(path) for name, path in sorted(files.items())}
    record = {
        "name": manifest["name"],
        "commit": commit,
        "files": [
            {"file": n, "bytes": files[n].stat().st_size, "sha256": d} for n, d in sums.items()
        ],
        "gguf_sha256": {e["file"]: e["sha256"] for e in manifest["files"]},
        "built_on": host if host is not None else machine(),
    }
    release_json = (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode()
    sums["release.json"] = hashlib.sha256(release_json).hexdigest()
    sumfile = "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())).encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    tarball = out_dir / f"{stem}.tar.gz"
    fd, tmp = tempfile.mkstemp(prefix=f".{tarball.name}.", suffix=".tmp", dir=out_dir)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for name in sorted([*files, "release.json", "SHA256SUMS"]):
                member = f"{stem}/{name}"
                if name == "release.json":
                    _add(tar, member, data=release_json)
                elif name == "SHA256SUMS":
                    _add(tar, member, data=sumfile)
                else:
                    _add(tar, member, path=files[name])
        Path(tmp).chmod(0o644)
        Path(tmp).replace(tarball)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    from distill.records import atomic_write_text

    digest = _sha256(tarball)
    atomic_write_text(tarball.with_name(tarball.name + ".sha256"), f"{digest}  {tarball.name}\n")
    return {
        "tarball": str(tarball),
        "sha256": digest,
        "files": sorted([*files, "release.json", "SHA256SUMS"]),
        "gguf_sha256": record["gguf_sha256"],
    }


def compare(first: Path, second: Path) -> list[str]:
    """The differences between two export manifests' GGUFs (empty: the same files)."""
    a, b = (
        {e["quant"]: e for e in json.loads(p.read_text(encoding="utf-8"))["files"]}
        for p in (first, second)
    )
    lines = []
    for quant in sorted(set(a) | set(b)):
        if quant not in a or quant not in b:
            lines.append(f"{quant}: only in {first if quant in a else second}")
        elif a[quant]["sha256"] != b[quant]["sha256"]:
            lines.append(
                f"{quant}: {a[quant]['file']} {a[quant]['sha256'][:16]} != "
                f"{b[quant]['file']} {b[quant]['sha256'][:16]}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Pack a run directory, or compare two manifests."""
    parser = argparse.ArgumentParser(
        prog="python -m distill.release",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/release"), help="demo output")
    parser.add_argument("--out", type=Path, default=Path("dist"), help="tarball directory")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar="MANIFEST", help="compare two exports' GGUFs"
    )
    args = parser.parse_args(argv)
    try:
        if args.compare:
            differences = compare(*args.compare)
            for line in differences:
                print(f"release: differs: {line}", file=sys.stderr)  # noqa: T201 - CLI
            print(json.dumps({"same": not differences, "differences": differences}))  # noqa: T201
            return 1 if differences else 0
        print(json.dumps(pack(args.run_dir, args.out)))  # noqa: T201 - CLI summary
    except (ReleaseError, OSError, KeyError, json.JSONDecodeError) as err:
        print(f"release: error: {err}", file=sys.stderr)  # noqa: T201 - CLI
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
