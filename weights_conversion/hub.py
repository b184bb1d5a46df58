"""Finding a checkpoint's directory: a local path, or a Hugging Face hub id through the hub cache.

Hub ids go through `huggingface_hub.snapshot_download`, so they honour what users set for the
hub: `HF_HOME` / `HF_HUB_CACHE` (or `cache_dir=`), `HF_HUB_OFFLINE=1` (or `local_files_only=True`),
`HF_TOKEN` / `hf auth login` (or `token=`), and a `revision=` (branch, tag or commit). A repository
that cannot be had raises one error that says which repository, which revision, which cache
directory and why — not a chain of connection tracebacks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

CONFIG_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")


@dataclass(frozen=True)
class HubOptions:
    """`snapshot_download`'s options, as `from_pretrained` takes them."""

    revision: str | None = None
    cache_dir: str | Path | None = None
    token: str | bool | None = None
    local_files_only: bool = False

    def for_another_repository(self) -> HubOptions:
        """The options for a repository this one refers to (original LLaVA's CLIP tower): the
        same cache, token and offline setting, but that repository's default revision."""
        return replace(self, revision=None)


def resolve_directory(name_or_path: str | Path, hub: HubOptions = HubOptions(), weights: bool = True) -> Path:
    """A local directory as is; otherwise a hub id's snapshot in the cache (downloaded unless
    offline): configs, tokenizer and chat template, and the weights (safetensors, or `.bin`
    shards when the repository has no safetensors)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; give the checkpoint's directory")
    repo_id = str(name_or_path)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")) or repo_id.endswith("/"):
        raise FileNotFoundError(f"{repo_id!r} is neither a local directory nor a hub id of the form 'owner/name'{_toy_hint(repo_id)}")
    directory = _snapshot(repo_id, hub, list(CONFIG_PATTERNS) + (["*.safetensors"] if weights else []))
    if weights and not list(directory.glob("*.safetensors")):  # older repositories ship only .bin shards
        directory = _snapshot(repo_id, hub, list(CONFIG_PATTERNS) + ["*.bin"])
    return directory


def _snapshot(repo_id: str, hub: HubOptions, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    what = repo_id + (f" (revision {hub.revision!r})" if hub.revision else "")
    try:
        return Path(snapshot_download(
            repo_id, revision=hub.revision, cache_dir=hub.cache_dir, token=hub.token,
            local_files_only=hub.local_files_only, allow_patterns=patterns,
        ))  # fmt: skip
    except LocalEntryNotFoundError:
        cache = Path(hub.cache_dir or constants.HF_HUB_CACHE)
        if hub.local_files_only or constants.HF_HUB_OFFLINE:
            why = "local_files_only=True" if hub.local_files_only else "HF_HUB_OFFLINE=1"
            fix = "download it once online (or copy the cache over), or drop " + why
        else:
            why, fix = "the hub could not be reached", "check the connection, or download it where the hub can be reached"
        error: Exception = FileNotFoundError(f"{what} is not in the Hugging Face cache at {cache} and {why} forbids downloading it; {fix}")
    except GatedRepoError:
        error = PermissionError(f"{what} is gated: accept its conditions on huggingface.co, then pass token=... or log in with `hf auth login`")
    except RepositoryNotFoundError:
        error = FileNotFoundError(f"no repository {repo_id!r} on the hub (if it is private, pass token=... or log in with `hf auth login`)")
    except RevisionNotFoundError:
        error = FileNotFoundError(f"{repo_id!r} has no revision {hub.revision!r} (a branch, tag or commit hash)")
    raise error from None


def _toy_hint(name: str) -> str:
    from hooked_vlm.toy_models import suggest_toy_model

    suggestion = suggest_toy_model(name)
    return f"; did you mean the toy model {suggestion!r}?" if suggestion else ""
