"""A local directory laid out as the Hugging Face hub cache, so that hub ids load offline.

`huggingface_hub` keeps a repository as `models--{owner}--{name}/` with the file contents under
`blobs/` (named by their etag: the sha256 of large LFS files, the git blob hash of small ones),
one folder per commit under `snapshots/{commit}/` whose files are relative symlinks into
`blobs/`, and `refs/{branch}` holding a branch's commit. `add_to_hub_cache` writes exactly that,
so `snapshot_download(repo_id, cache_dir=..., local_files_only=True)` (or `HF_HUB_OFFLINE=1`)
finds the files, by branch name or by commit hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model", ".pt", ".pth", ".msgpack", ".h5")


def repo_folder(cache_dir: str | Path, repo_id: str) -> Path:
    """Where the cache keeps `repo_id` (a model repository)."""
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def add_to_hub_cache(cache_dir: str | Path, repo_id: str, source: str | Path, *, branch: str | None = "main", commit: str | None = None) -> str:
    """Copy every file of the directory `source` into the cache as one commit of `repo_id`, and
    point `branch` at it (None: reachable by its commit hash only). Returns the commit hash (by
    default derived from the files, so the same files give the same commit)."""
    source = Path(source)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{source} holds no files")
    etags = {path: _etag(path) for path in files}
    if commit is None:
        listing = "\n".join(f"{p.relative_to(source).as_posix()} {etag}" for p, etag in etags.items())
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
    folder = repo_folder(cache_dir, repo_id)
    snapshot = folder / "snapshots" / commit
    for path, etag in etags.items():
        blob = folder / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(path.read_bytes())
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    if branch is not None:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / branch).write_text(commit)
    return commit


def _etag(path: Path) -> str:
    """The hub's etag: sha256 for LFS files, the git blob sha1 for the others."""
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
