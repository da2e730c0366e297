"""The build and its run-time configuration: OpenMP, SIMD paths, environment variables, determinism.

- build_info() tells the truth about the extension (OpenMP on, SIMD paths compiled / supported / selected);
- OpenMP really runs a team of 2 threads when asked;
- every SIMD path agrees with the best one on a real forward pass, within the logits checkpoint tolerance;
- LLORCH_SIMD and LLORCH_NUM_THREADS work at import (subprocesses), bad values warn and change nothing;
- logits are bitwise identical for 1, 2, 3 and 4 threads (prompt pass and decode step), tiny / odd / gpt2 shapes.
The automatic thread count (llorch.runtime) is tested in test_threads.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import llorch
from llorch import _kernels as K
from llorch.runtime import thread_setting
from llorch.trace import BY_NAME

SUPPORTED = K.simd_supported().split()
BEST = SUPPORTED[0]
LOGITS_TOL = BY_NAME["logits"]   # max|ours - ref| <= atol + rtol * max|ref|
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]   # 10 tokens


@pytest.fixture
def restore_runtime():
    """Tests change the thread count and the SIMD path of this process: put both back."""
    threads, simd = thread_setting(), K.simd_selected()
    yield
    llorch.set_num_threads(threads)
    K.select_simd(simd)


def prompt_and_decode(model: llorch.GPT2) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a prompt pass [T, V] and of one greedy decode step after it [1, V], from an empty cache."""
    cache = model.new_cache()
    prompt = model.forward(PROMPT, cache)
    step = model.forward([int(prompt[-1].argmax())], cache)
    return prompt, step


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with `env` added to a copy of this environment minus llorch's own variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("LLORCH_SIMD", "LLORCH_NUM_THREADS", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True,
                          timeout=60, check=True)


INFO = "import json, llorch; print(json.dumps(llorch.build_info()))"


def test_build_info():
    info = llorch.build_info()
    assert info["version"] == llorch.__version__
    assert info["openmp"] is True and info["openmp_version"] >= 201107   # OpenMP 3.1 at least
    assert info["max_threads"] >= 1
    assert info["compiler"] and info["compiler"] != "unknown"
    assert "baseline" in info["simd_supported"]
    assert set(info["simd_supported"]) <= set(info["simd_compiled"])
    assert info["simd_selected"] in info["simd_supported"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert info["simd_compiled"] == ["avx512", "avx2", "baseline"]


def test_auto_selects_the_best_supported_path(restore_runtime):
    K.select_simd("baseline")
    K.select_simd("auto")
    assert K.simd_selected() == BEST


def test_openmp_runs_two_threads(restore_runtime):
    llorch.set_num_threads(2)
    assert K.max_threads() == 2
    assert K.parallel_team_size() == 2
    llorch.set_num_threads(1)
    assert K.parallel_team_size() == 1


@pytest.mark.parametrize("shape", ["tiny", "odd"])
@pytest.mark.parametrize("path", SUPPORTED[1:])   # every path but the best; always baseline on x86-64
def test_simd_paths_agree_on_a_forward_pass(checkpoint, restore_runtime, shape, path):
    model = llorch.load(checkpoint(shape))
    K.select_simd(BEST)
    best = prompt_and_decode(model)
    K.select_simd(path)
    ours = prompt_and_decode(model)
    for got, want in zip(ours, best):
        bound = LOGITS_TOL.atol + LOGITS_TOL.rtol * np.abs(want).max()
        assert np.abs(got - want).max() <= bound, f"{path} vs {BEST}: {np.abs(got - want).max():.3g} > {bound:.3g}"
        assert not np.array_equal(got, want), "identical bits: was the other path really used?"
        np.testing.assert_array_equal(got.argmax(axis=-1), want.argmax(axis=-1))


@pytest.mark.parametrize("path", SUPPORTED)
def test_llorch_simd_env_selects_the_path(path):
    info = json.loads(run_python(INFO, LLORCH_SIMD=path).stdout)
    assert info["simd_selected"] == path


def test_invalid_llorch_simd_warns_and_keeps_auto():
    done = run_python(INFO, LLORCH_SIMD="avx1024")
    assert done.stderr.startswith("llorch: warning: LLORCH_SIMD='avx1024' ignored: ") and done.stderr.count("\n") == 1
    assert json.loads(done.stdout)["simd_selected"] == BEST


@pytest.mark.parametrize("env, threads", [
    ({"OMP_NUM_THREADS": "2"}, 2),                              # OpenMP's own variable works...
    ({"OMP_NUM_THREADS": "2", "LLORCH_NUM_THREADS": "1"}, 1),   # ...and LLORCH_NUM_THREADS beats it
    ({"OMP_NUM_THREADS": "1", "LLORCH_NUM_THREADS": "2"}, 2),
])
def test_thread_count_from_environment(env, threads):
    code = "import llorch; from llorch import _kernels as K; print(K.max_threads(), K.parallel_team_size())"
    assert run_python(code, **env).stdout.split() == [str(threads)] * 2


def test_invalid_llorch_num_threads_warns():
    done = run_python(INFO, LLORCH_NUM_THREADS="abc", OMP_NUM_THREADS="1")
    assert done.stderr == "llorch: warning: LLORCH_NUM_THREADS='abc' ignored: expected a positive integer or \"auto\"\n"
    info = json.loads(done.stdout)
    assert (info["max_threads"], info["threads_mode"], info["threads_source"]) == (1, "fixed", "OMP_NUM_THREADS")


@pytest.mark.parametrize("env, mode, source", [
    ({}, "auto", "auto"),                                                 # nothing fixes the count: auto
    ({"LLORCH_NUM_THREADS": "auto", "OMP_NUM_THREADS": "1"}, "auto", "auto"),   # auto beats OpenMP's variable
    ({"LLORCH_NUM_THREADS": "1"}, "fixed", "LLORCH_NUM_THREADS"),
    ({"OMP_NUM_THREADS": "1"}, "fixed", "OMP_NUM_THREADS"),
])
def test_thread_mode_from_environment(env, mode, source):
    info = json.loads(run_python(INFO, **env).stdout)
    assert (info["threads_mode"], info["threads_source"]) == (mode, source)
    assert info["threads"] == (info["threads_ceiling"] if mode == "auto" else 1) == info["max_threads"]


@pytest.mark.parametrize("shape", ["tiny", "odd", "gpt2"])
def test_logits_bitwise_identical_for_any_thread_count(checkpoint, restore_runtime, shape):
    model = llorch.load(checkpoint(shape))
    runs = {}
    for threads in (1, 2, 3, 4):
        llorch.set_num_threads(threads)
        assert K.parallel_team_size() == threads
        runs[threads] = prompt_and_decode(model)
    for threads in (2, 3):
        for name, got, want in zip(("prompt", "decode"), runs[threads], runs[1]):
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
                f"{shape} {name}: {threads} threads differ from 1 (max |diff| {np.abs(got - want).max():.3g})"


def test_kernels_never_allocate_or_abort():
    """llorch.h promises it: scratch comes from the caller, and every error is caught by the Cython checks."""
    ops = os.path.join(os.path.dirname(__file__), os.pardir, "csrc", "ops")
    if not os.path.isdir(ops):
        pytest.skip("no source tree beside the tests")
    forbidden = ("malloc(", "calloc(", "realloc(", "free(", "abort(", "exit(")
    for name in sorted(os.listdir(ops)):
        with open(os.path.join(ops, name), encoding="utf-8") as f:
            text = f.read()
        assert not [call for call in forbidden if call in text], f"csrc/ops/{name} allocates or aborts"
