"""What the references share: reading the checkpoint's config, and the cache-position rule of a pass."""

from __future__ import annotations

import json
import os


def read_config(checkpoint_dir: str) -> tuple[int, int, int, int, float]:
    """(n_layer, n_head, n_embd, n_positions, layer_norm_epsilon) from the directory's config.json."""
    with open(os.path.join(checkpoint_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"],
            config["layer_norm_epsilon"])


def pass_end(start_pos: int, n_tokens: int, n_cached: int, n_positions: int) -> int:
    """S = start_pos + T, once sure the pass fits: it may rewrite cached positions but not leave a gap."""
    S = start_pos + n_tokens
    if not 0 <= start_pos <= n_cached or S > n_positions:
        raise ValueError(f"start_pos {start_pos} with {n_tokens} tokens: {n_cached} positions cached, "
                         f"{n_positions} at most")
    return S
