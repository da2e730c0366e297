"""llorch-validate as users run it: a subprocess on seeded random checkpoints (tiny shapes).

It must pass against every reference on honest weights; catch weights that differ in one layer at that
layer's first checkpoint; refuse bad input in one line with exit 2; and name the pip install a missing
reference needs. `import llorch` must stay free of the references' frameworks.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llorch
from llorch.compare import main as llorch_compare
from llorch.references import PROMPT_IDS
from llorch.testing import SHAPES
from llorch.trace import forward_order

LLORCH_VALIDATE = ([shutil.which("llorch-validate")] if shutil.which("llorch-validate")   # the installed script,
                   else [sys.executable, "-m", "llorch.validate"])                        # else its module
TEST_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.devnull, "LLORCH_NUM_THREADS": "1"}
PER_PASS = len(forward_order(SHAPES["tiny"].n_layer))   # checkpoints in one pass of the tiny shape
TINY_CHECKPOINTS = (1 + 3) * PER_PASS                    # the prompt pass and 3 decode steps


def validate(*args, env=None, command=LLORCH_VALIDATE):
    """(returncode, stdout, stderr) of one llorch-validate run."""
    done = subprocess.run(command + [str(a) for a in args], env={**TEST_ENV, **(env or {})},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, done.stderr


def table_line(out: str, reference: str) -> list[str]:
    return next(line.split(None, 5) for line in out.splitlines() if line.startswith(reference + " "))


def test_import_llorch_pulls_in_no_reference_framework():
    code = ("import sys, llorch, llorch.references, llorch.validate; "
            "print([m for m in ('torch', 'transformers', 'tinygrad', 'matplotlib') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], env=TEST_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_passes_against_every_reference_and_writes_comparable_traces(checkpoint, tmp_path, capsys):
    traces, plot = tmp_path / "traces", tmp_path / "errors.png"
    code, out, err = validate("-m", checkpoint("tiny"), "--reference", "hf,tinygrad,numpy64",
                              "--trace-dir", traces, "--plot", plot)
    assert code == 0, out + err
    for reference in ("hf", "tinygrad", "numpy64"):
        name, compared, passed, worst_rel, _, divergence = table_line(out, reference)
        assert (compared, passed, divergence) == (str(TINY_CHECKPOINTS), str(TINY_CHECKPOINTS), "-")
        assert float(worst_rel) < 5e-5
    assert "greedy: 10 tokens, llorch = HF generate" in out
    assert out.splitlines()[-1] == "PASS"
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(traces)) == ["hf", "llorch", "numpy64", "tinygrad"]
    assert llorch_compare([str(traces / "llorch"), str(traces / "tinygrad")]) == 0   # llorch-compare reads them
    assert f"{TINY_CHECKPOINTS} checkpoints: {TINY_CHECKPOINTS} pass" in capsys.readouterr().out


def test_json_report_on_bfloat16_weights(checkpoint):
    """Every implementation widens the bf16 weights to the same FP32 values, so nothing parts."""
    path = checkpoint("tiny", dtype="bfloat16")
    code, out, err = validate("-m", path, "--json", "--decode-steps", 2)
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"schema", "passed", "model", "reference_model", "prompt_ids", "decode_ids",
                           "references", "greedy", "expect"}
    assert (report["schema"], report["passed"], report["expect"]) == ("llorch-validate/1", True, None)
    assert report["model"] == report["reference_model"] == path
    assert report["prompt_ids"] == list(PROMPT_IDS) and len(report["decode_ids"]) == 2
    assert [r["name"] for r in report["references"]] == ["hf", "numpy64"]   # the default
    for r in report["references"]:
        n = (1 + 2) * PER_PASS
        assert (r["passed"], r["compared"], r["passed_count"]) == (True, n, n)
        assert r["first_failure"] is None and r["failures"] == []
        assert 0 < r["worst_rel"] < 5e-5 and r["worst_key"].startswith("s")
    greedy = report["greedy"]
    assert greedy["n"] == 10 and greedy["llorch"] == greedy["hf"] and greedy["passed"] is True
    assert greedy["text"] == llorch.tokenizer().decode(list(PROMPT_IDS) + greedy["llorch"])
    assert report["decode_ids"] == greedy["llorch"][:2]   # the decode steps follow llorch's greedy path


@pytest.fixture(scope="module")
def perturbed(checkpoint, tmp_path_factory) -> str:
    """A copy of the tiny checkpoint whose layer 1 ln_1 gain is 1% larger: the references get this one."""
    directory = tmp_path_factory.mktemp("perturbed")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(checkpoint("tiny"), name), directory)
    weights = load_file(str(directory / "model.safetensors"))
    weights["h.1.ln_1.weight"] = weights["h.1.ln_1.weight"] * np.float32(1.01)
    save_file(weights, str(directory / "model.safetensors"))
    return str(directory)


def test_weights_changed_in_one_layer_are_caught_at_that_layers_first_checkpoint(checkpoint, perturbed):
    code, out, err = validate("-m", checkpoint("tiny"), "--reference-model", perturbed, "--json", "--greedy", 0)
    assert code == 1, err
    report = json.loads(out)
    assert report["passed"] is False and report["reference_model"] == perturbed
    for r in report["references"]:
        first = r["first_failure"]
        assert (first["key"], first["name"], first["layer"], first["step"], first["status"]) == \
               ("s0.h1.ln_1", "ln_1", 1, 0, "FAIL"), r["name"]
        assert all(f["layer"] != 0 and f["name"] != "embed" for f in r["failures"])   # before layer 1, all pass


def test_the_table_names_the_first_diverging_checkpoint_its_layer_and_pass(checkpoint, perturbed):
    code, out, _ = validate("-m", checkpoint("tiny"), "--reference-model", perturbed, "--reference", "numpy64",
                            "--greedy", 0)
    assert code == 1
    assert table_line(out, "numpy64")[5].startswith("s0.h1.ln_1 (layer 1, prompt pass: FAIL, rel ")
    assert out.splitlines()[-1] == "FAIL"


@pytest.mark.parametrize("matches", [True, False])
def test_expect_checks_the_prompt_and_its_greedy_continuation(checkpoint, matches):
    path = checkpoint("tiny")
    text = llorch.tokenizer().decode(list(PROMPT_IDS) + list(llorch.generate(llorch.load(path), list(PROMPT_IDS), 4)))
    code, out, _ = validate("-m", path, "--reference", "numpy64", "--greedy", 4,
                            "--expect", text if matches else text + "!")
    assert code == (0 if matches else 1)
    assert ("expect: match" in out) == matches


def test_a_hub_id_in_the_local_cache_and_a_model_safetensors_path(checkpoint, tmp_path):
    snapshot = tmp_path / "models--openai-community--gpt2" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(checkpoint("tiny"), name), snapshot)
    (tmp_path / "models--openai-community--gpt2" / "refs").mkdir()
    (tmp_path / "models--openai-community--gpt2" / "refs" / "main").write_text("0123abc")
    for model in ("gpt2", snapshot / "model.safetensors"):
        code, out, err = validate("-m", model, "--reference", "numpy64", "--greedy", 0, "--json",
                                  env={"HF_HUB_CACHE": str(tmp_path)})
        assert code == 0, err
        assert json.loads(out)["model"] == str(snapshot)


@pytest.mark.parametrize("args, message", [
    (["-m", "/nonexistent/gpt2"], "-m /nonexistent/gpt2: no such file or directory"),
    (["-m", "gpt2"], "-m gpt2: not a local file or directory; not in the Hugging Face cache"),
    (["--reference", "hf,torch"], "unknown reference 'torch'"),
    (["--prompt-ids", "15496,x"], "'x' is not a token id"),
    (["-p", ""], "the prompt is empty"),
    (["--greedy", "0", "--expect", "Hello."], "--expect needs greedy tokens"),
    (["--decode-steps", "200"], "exceeds the context of 128 positions"),
    (["--reference-model", "/nonexistent"], "--reference-model /nonexistent: no such file or directory"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, args, message):
    model = [] if "-m" in args else ["-m", checkpoint("tiny")]
    code, out, err = validate(*model, "--reference", "numpy64", *args)
    assert (code, out) == (2, "")
    assert err.startswith("llorch-validate: error: ") and message in err and err.count("\n") == 1, err


def test_a_model_file_not_named_model_safetensors_is_bad_input(checkpoint, tmp_path):
    for name, target in (("config.json", "config.json"), ("model.safetensors", "weights.safetensors")):
        shutil.copy(os.path.join(checkpoint("tiny"), name), tmp_path / target)
    code, _, err = validate("-m", tmp_path / "weights.safetensors", "--reference", "numpy64")
    assert code == 2 and "the references read a directory's model.safetensors" in err


@pytest.mark.parametrize("reference, framework, install", [
    ("hf", "torch", "pip install 'llorch[validate]'"),
    ("tinygrad", "tinygrad", "pip install tinygrad"),
])
def test_a_missing_framework_names_its_pip_install(checkpoint, reference, framework, install):
    """The framework is made unimportable (None in sys.modules), as if it were not installed."""
    hide = [sys.executable, "-c", f"import sys; sys.modules[{framework!r}] = None; "
                                  "from llorch.validate import main; sys.exit(main())"]
    code, out, err = validate("-m", checkpoint("tiny"), "--reference", f"numpy64,{reference}", command=hide)
    assert (code, out) == (2, "")
    assert err == (f"llorch-validate: error: the {reference} reference needs {framework}, which is not installed: "
                   f"{install}\n")
