"""Where `llorch-run -m MODEL` finds its weights: a local path, the Hugging Face cache, or the hub.

A MODEL that names an existing file or directory is used as it is (llorch.load checks it). A hub id
(`gpt2`, `openai-community/gpt2-xl`, `distilgpt2`, ...) is looked up in the local Hugging Face cache, laid
out as huggingface_hub writes it:

    $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
      models--openai-community--gpt2/
        refs/main                  the commit hash of the snapshot to use
        snapshots/<hash>/          config.json, model.safetensors (symlinks into blobs/)

and, failing that, downloaded with huggingface_hub (the optional `hub` extra) unless HF_HUB_OFFLINE is set.
Only config.json and model.safetensors are fetched: llorch needs nothing else.
"""

from __future__ import annotations

import os
import re

from .checkpoint import WEIGHTS_FILE
from .config import CheckpointError

REQUIRED_FILES = ("config.json", WEIGHTS_FILE)
# The hub moved these repositories under organisations; the bare names still resolve on the hub and
# older caches hold them as models--gpt2 etc., so both spellings name the same model.
_ORG_OF_BARE_NAME = {
    "gpt2": "openai-community", "gpt2-medium": "openai-community", "gpt2-large": "openai-community",
    "gpt2-xl": "openai-community", "distilgpt2": "distilbert",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}   # how huggingface_hub reads boolean environment variables


class ModelNotFoundError(CheckpointError):
    """A MODEL that is neither a local path nor a hub id whose weights could be found or fetched."""


def resolve_model(model: str) -> str:
    """A local path llorch.load accepts for MODEL: the path itself, a cached snapshot or a fresh download.

    Raises ModelNotFoundError, one line saying what was tried and how to provide the weights (the caller
    names MODEL)."""
    if os.path.exists(model) or not is_hub_id(model):
        return model
    cache_dir = hub_cache_dir()
    repo_ids = repo_id_spellings(model)
    for repo_id in repo_ids:
        snapshot = cached_snapshot(cache_dir, repo_id)
        if snapshot:
            return snapshot
    tried = ["not a local file or directory",
             f"not in the Hugging Face cache {cache_dir} (looked for "
             f"{' and '.join(_repo_dir_name(r) for r in repo_ids)} with {' and '.join(REQUIRED_FILES)})"]
    download_failure = _download_unavailable()
    if download_failure is None:
        try:
            return download(repo_ids[0], cache_dir)
        except download_errors() as e:
            download_failure = f"downloading {repo_ids[0]} failed ({_first_line(e)})"
    raise ModelNotFoundError(
        "; ".join(tried + [download_failure]) + ". To provide weights: pass a local GPT-2 directory or "
        ".safetensors file with -m; or set HF_HUB_CACHE (or HF_HOME) to a cache that holds it; or go online "
        "with `pip install 'llorch[hub]'` (HF_HUB_OFFLINE unset) to download it; or, offline, make a seeded "
        "random checkpoint at GPT-2's shape (gibberish text, real code paths): "
        "python -m llorch.testing gpt2 /tmp/gpt2-random, then -m /tmp/gpt2-random")


def is_hub_id(model: str) -> bool:
    """`name` or `org/name` in the hub's alphabet, and not a file name llorch would read."""
    return bool(_HUB_ID.fullmatch(model)) and not model.endswith(".safetensors")


def repo_id_spellings(model: str) -> list[str]:
    """The repository ids that name MODEL in a cache: the current one first, then a legacy bare name."""
    org, _, name = model.rpartition("/")
    known_org = _ORG_OF_BARE_NAME.get(name)
    if known_org is None or org not in ("", known_org):
        return [model]
    return [f"{known_org}/{name}", name]


def hub_cache_dir() -> str:
    """The hub cache directory, chosen from the environment the way huggingface_hub chooses it."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    hf_home = os.environ.get("HF_HOME") or os.path.join(xdg_cache, "huggingface")
    return os.path.join(os.path.expanduser(hf_home), "hub")


def cached_snapshot(cache_dir: str, repo_id: str) -> str | None:
    """The snapshot directory refs/main points at, if it holds every file llorch needs."""
    repo_dir = os.path.join(cache_dir, _repo_dir_name(repo_id))
    try:
        with open(os.path.join(repo_dir, "refs", "main"), encoding="utf-8") as f:
            revision = f.read().strip()
    except OSError:
        return None
    snapshot = os.path.join(repo_dir, "snapshots", revision)
    return snapshot if all(os.path.isfile(os.path.join(snapshot, f)) for f in REQUIRED_FILES) else None


def download(repo_id: str, cache_dir: str) -> str:
    """Fetch config.json and model.safetensors into the cache (huggingface_hub shows progress bars on
    stderr); returns the snapshot directory."""
    from huggingface_hub import hf_hub_download
    paths = [hf_hub_download(repo_id, filename, cache_dir=cache_dir) for filename in REQUIRED_FILES]
    return os.path.dirname(paths[0])


def download_errors() -> tuple[type[BaseException], ...]:
    """OSError covers HTTP, connection, offline and disk errors; a file missing from a repository is
    huggingface_hub's EntryNotFoundError, which is not an OSError."""
    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        return (OSError,)
    return (OSError, EntryNotFoundError)


def _download_unavailable() -> str | None:
    """Why no download will be tried, or None when it will."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES:
        return "download skipped: HF_HUB_OFFLINE is set"
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return "download skipped: huggingface_hub is not installed"
    return None


def _repo_dir_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
