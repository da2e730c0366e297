"""MODEL as a hub id, found in a local Hugging Face cache (llorch.hub) as llorch-run resolves it."""

import os
import shutil

import pytest

from test_cli import PROMPT, run_cli, run_json, tiny  # noqa: F401 (tiny: a fixture)


def fake_hub_cache(cache_dir, repo_dir_name, checkpoint) -> None:
    """A cache entry as huggingface_hub writes it: refs/main -> snapshots/<rev>/ with symlinks into blobs/."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / repo_dir_name
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        blob = repo / "blobs" / f"blob-{name}"
        shutil.copyfile(os.path.join(checkpoint, name), blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.mark.parametrize("model, repo_dir_name, cache_variable", [
    ("gpt2", "models--openai-community--gpt2", "HF_HUB_CACHE"),
    ("gpt2", "models--gpt2", "HF_HUB_CACHE"),                         # a cache from before the move
    ("openai-community/gpt2", "models--gpt2", "HF_HUB_CACHE"),
    ("distilgpt2", "models--distilbert--distilgpt2", "HF_HOME"),      # HF_HOME/hub
])
def test_hub_id_resolves_from_the_local_cache(tiny, tmp_path, model, repo_dir_name, cache_variable):
    cache_dir = tmp_path / "hub"
    fake_hub_cache(cache_dir, repo_dir_name, tiny)
    env = ({"HF_HUB_CACHE": str(cache_dir)} if cache_variable == "HF_HUB_CACHE"
           else {"HF_HUB_CACHE": "", "HF_HOME": str(tmp_path)})
    result = run_json("-m", model, "-p", PROMPT, "-n", 6, env=env)
    assert result["model"].startswith(str(cache_dir / repo_dir_name / "snapshots"))
    assert result["tokens"] == run_json("-m", tiny, "-p", PROMPT, "-n", 6)["tokens"]


def test_missing_hub_model_offline_says_how_to_provide_weights(tmp_path):
    code, out, err = run_cli("-p", PROMPT, env={"HF_HUB_CACHE": str(tmp_path)})   # default MODEL: gpt2
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("llorch-run: error: model gpt2: ")
    for said in (str(tmp_path), "models--openai-community--gpt2", "models--gpt2", "HF_HUB_OFFLINE",
                 "HF_HUB_CACHE", "pip install 'llorch[hub]'", "python -m llorch.testing"):
        assert said in err
