"""llorch-run as users run it: the installed console script in a subprocess, on seeded random checkpoints.

Every run gets HF_HUB_OFFLINE=1 and an empty HF_HUB_CACHE unless a test says otherwise, so no test reads
the machine's Hugging Face cache or tries the network; and one kernel thread, since the suite shares few
cores with other work and OpenMP threads that wait for a busy core make a run many times slower.
"""

import json
import os
import pty
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import llorch
import llorch.testing
from llorch.sampling import Sampler
from llorch.checkpoint import write_safetensors
from llorch.testing import SHAPES, hf_config, random_weights
from llorch.trace import DirectoryTracer, checkpoint_key, forward_order, run_trace
from llorch.references import build as build_reference
from test_stream import EMOJI, is_utf8

enc = llorch.tokenizer()


def console_script(name: str, module: str) -> list[str]:
    """The installed console script, or else its module run by this Python."""
    return [shutil.which(name)] if shutil.which(name) else [sys.executable, "-m", module]


LLORCH_RUN = console_script("llorch-run", "llorch.cli")
TEST_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.devnull, "LLORCH_NUM_THREADS": "1"}
PROMPT = "Hello, I'm a language model,"


def run_cli(*args, env=None, stdin=subprocess.DEVNULL):
    """(returncode, stdout as UTF-8, stderr) of one llorch-run."""
    done = subprocess.run(LLORCH_RUN + [str(a) for a in args], env={**TEST_ENV, **(env or {})}, stdin=stdin,
                          capture_output=True, timeout=300)
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


def run_json(*args, **options) -> dict:
    code, out, err = run_cli(*args, "--json", **options)
    assert code == 0 and err == "", err   # with --json, stderr stays quiet
    return json.loads(out)


def untimed(result: dict) -> dict:
    """A --json result without its timings, which differ from run to run."""
    return {key: value for key, value in result.items() if key != "timings"}


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return checkpoint("tiny")   # tests/conftest.py: a seeded random checkpoint (seed 0), made once per session


def two_cycle_checkpoint(directory, up: int, down: int) -> str:
    """A tiny GPT-2 whose greedy continuation alternates: after `up` comes `down`, after `down` comes `up`.

    The blocks add nothing (zero output projections) and there are no position embeddings, so ln_f sees
    only wte[last token]. wte gives `up` +1 and `down` -1 on dimension 0, every other token about 0, and
    ln_f keeps dimension 0 alone with gain -1: the logits are wte[:, 0] times minus the last token's sign."""
    dims = SHAPES["tiny"]
    weights = random_weights(dims, seed=0)
    wte = weights["wte.weight"]
    wte[[up, down]] = 0
    wte[up, 0], wte[down, 0] = 1, -1
    weights["wpe.weight"][:] = 0
    for name, values in weights.items():
        if ".c_proj." in name:
            values[:] = 0
    weights["ln_f.weight"][:] = 0
    weights["ln_f.weight"][0] = -1
    weights["ln_f.bias"][:] = 0
    os.makedirs(directory)
    write_safetensors(os.path.join(directory, "model.safetensors"), weights)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config(dims), f)
    return str(directory)


# --- the result: --json against llorch.generate and HF, streaming against --json -------------------------

@pytest.mark.parametrize("shape, n", [("tiny", 24), ("gpt2", 12)])
def test_json_equals_llorch_generate_and_hf_greedy(checkpoint, shape, n):
    path = checkpoint(shape)
    result = run_json("-m", path, "-p", PROMPT, "-n", n)
    ids = enc.encode(PROMPT)
    expected = list(llorch.generate(llorch.load(path), ids, n, eos_token_id=llorch.EOT_TOKEN))
    assert result["prompt_tokens"] == ids
    from llorch.references.hf import hf_greedy, load_hf   # torch only for the tests that need it
    assert result["tokens"] == expected == hf_greedy(load_hf(path), ids, n, llorch.EOT_TOKEN)
    assert result["text"] == enc.decode(expected)
    assert result["stop_reason"] == "max_tokens" and result["model"] == path
    assert set(result["timings"]) == {"load_s", "ttft_s", "prefill_tok_s", "decode_tok_s"}
    assert all(value > 0 for value in result["timings"].values())


@pytest.mark.parametrize("prompt", ["Hello.", "The quick brown fox", "def f(x):\n    return"])
def test_streamed_text_equals_json_text(tiny, prompt):
    expected = run_json("-m", tiny, "-p", prompt, "-n", 40)["text"]
    code, out, _ = run_cli("-m", tiny, "-p", prompt, "-n", 40)
    assert code == 0 and out == expected + "\n"   # the prompt is not echoed; a final newline (spec 12)
    assert run_cli("-m", tiny, "-p", prompt, "-n", 40, "--no-stream")[1] == expected + "\n"
    assert run_cli("-m", tiny, "-p", prompt, "-n", 40, "--display-prompt")[1] == prompt + expected + "\n"


def test_streamed_sampled_text_with_split_characters_equals_json_text(tiny):
    """Sampling a random model picks tokens that end inside a UTF-8 character; the stream matches anyway."""
    options = ["-m", tiny, "-p", PROMPT, "-n", 120, "--temperature", 2, "--seed", 0]
    result = run_json(*options)
    assert any(not is_utf8(enc.decode_single_token_bytes(t)) for t in result["tokens"])
    assert run_cli(*options)[1] == result["text"] + "\n" == enc.decode(result["tokens"]) + "\n"


@pytest.mark.parametrize("n", [6, 7])
def test_split_emoji_streams_whole(tmp_path, n):
    path = two_cycle_checkpoint(tmp_path / "emoji", up=47249, down=222)
    result = run_json("-m", path, "-p", EMOJI, "-n", n)
    assert result["prompt_tokens"] == [47249, 222]
    assert result["tokens"] == [47249, 222] * (n // 2) + [47249] * (n % 2)
    # an even count ends on a whole emoji; an odd one leaves half of one, shown as U+FFFD like decode() does
    expected = EMOJI * (n // 2) + "\N{REPLACEMENT CHARACTER}" * (n % 2)
    assert result["text"] == expected
    assert run_cli("-m", path, "-p", EMOJI, "-n", n)[1] == expected + "\n"


# --- options --------------------------------------------------------------------------------------------

def test_stop_string_spanning_tokens(tiny):
    full = run_json("-m", tiny, "-p", PROMPT, "-n", 24)
    first, second = (enc.decode([t]) for t in full["tokens"][4:6])
    stop = first[-2:] + second[:2]   # the end of one token and the start of the next
    start = full["text"].index(stop)
    result = run_json("-m", tiny, "-p", PROMPT, "-n", 24, "--stop", "never there", stop)
    assert result["stop_reason"] == "stop" and result["text"] == full["text"][:start]
    assert run_cli("-m", tiny, "-p", PROMPT, "-n", 24, "--stop", stop)[1] == result["text"] + "\n"


def test_eos_stops_unless_ignored(tmp_path):
    path = two_cycle_checkpoint(tmp_path / "eos", up=40, down=llorch.EOT_TOKEN)   # 40 is "I"
    result = run_json("-m", path, "-p", "I", "-n", 5)
    assert result["tokens"] == [llorch.EOT_TOKEN] and result["stop_reason"] == "eos" and result["text"] == ""
    ignored = run_json("-m", path, "-p", "I", "-n", 3, "--ignore-eos")
    assert ignored["tokens"] == [llorch.EOT_TOKEN, 40, llorch.EOT_TOKEN]
    assert ignored["stop_reason"] == "max_tokens" and ignored["text"] == "<|endoftext|>I<|endoftext|>"


def test_lookup_draft_gives_the_plain_greedy_result(tiny):
    prompt = "def f(x):\n    return x\n\ndef f(x):\n    return x\n\ndef f("
    assert untimed(run_json("-m", tiny, "-p", prompt, "-n", 40, "--draft", "lookup")) == \
        untimed(run_json("-m", tiny, "-p", prompt, "-n", 40))


def test_seed_makes_sampling_reproducible(tiny):
    options = ["-m", tiny, "-p", PROMPT, "-n", 16, "--temperature", 0.8, "--top-k", 40, "--top-p", 0.9]
    first, again = (run_json(*options, "--seed", 7)["tokens"] for _ in range(2))
    assert first == again
    assert run_json(*options, "--seed", 8)["tokens"] != first
    sampler = Sampler(temperature=0.8, top_k=40, top_p=0.9, seed=7)
    assert first == list(llorch.generate(llorch.load(tiny), enc.encode(PROMPT), 16, sampler,
                                         eos_token_id=llorch.EOT_TOKEN))


def test_an_unseeded_sampled_run_records_the_seed_that_repeats_it(tiny):
    options = ["-m", tiny, "-p", PROMPT, "-n", 16, "--temperature", 1.5]
    drawn = run_json(*options)
    assert isinstance(drawn["seed"], int) and drawn["seed"] >= 0
    assert untimed(run_json(*options, "--seed", drawn["seed"])) == untimed(drawn)
    assert run_json(*options[:-2])["seed"] is None   # greedy: no sampler seed to record


@pytest.mark.parametrize("options, named", [(["--top-k", 5], "--top-k has"),
                                            (["--top-p", 0.5, "--seed", 3], "--top-p, --seed have")])
def test_sampling_options_without_a_temperature_warn_in_one_line(tiny, options, named):
    code, out, err = run_cli("-m", tiny, "-p", PROMPT, "-n", 4, "--json", *options)
    assert code == 0 and json.loads(out)["tokens"] == run_json("-m", tiny, "-p", PROMPT, "-n", 4)["tokens"]
    assert err == f"llorch-run: warning: {named} no effect without --temperature > 0: decoding is greedy\n"


def test_more_threads_than_cpus_warn_in_one_line(tiny):
    too_many = len(os.sched_getaffinity(0)) + 1
    code, _, err = run_cli("-m", tiny, "-p", PROMPT, "-n", 2, "--json", "--threads", too_many)
    assert code == 0
    assert err == (f"llorch-run: warning: --threads {too_many} exceeds the {too_many - 1} CPUs available to this "
                   "process: the threads would wait for each other\n")


def test_threads_option_wins_over_the_environment_and_changes_no_token(tiny):
    env = {"LLORCH_NUM_THREADS": "2"}
    assert json.loads(run_cli("--build-info", env=env)[1])["max_threads"] == 2
    assert json.loads(run_cli("--build-info", "--threads", 1, env=env)[1])["max_threads"] == 1
    auto = json.loads(run_cli("--build-info", "--threads", "auto", env=env)[1])
    assert (auto["threads_mode"], auto["threads"]) == ("auto", auto["threads_ceiling"])
    assert (untimed(run_json("-m", tiny, "-p", PROMPT, "--threads", 1, env=env))
            == untimed(run_json("-m", tiny, "-p", PROMPT, env=env))
            == untimed(run_json("-m", tiny, "-p", PROMPT, "--threads", "auto", env=env)))


def test_prompt_from_file_stdin_and_ids_equals_prompt_option(tiny, tmp_path):
    expected = untimed(run_json("-m", tiny, "-p", PROMPT, "-n", 8))
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n", encoding="utf-8")   # one final newline is dropped
    assert untimed(run_json("-m", tiny, "-f", prompt_file, "-n", 8)) == expected
    with open(prompt_file, "rb") as stdin:
        assert untimed(run_json("-m", tiny, "-n", 8, stdin=stdin)) == expected
    with open(prompt_file, "rb") as stdin:
        assert untimed(run_json("-m", tiny, "-n", 8, "-f", "-", stdin=stdin)) == expected   # -f -: stdin
    ids = ",".join(map(str, expected["prompt_tokens"]))
    assert untimed(run_json("-m", tiny, "--prompt-ids", ids, "-n", 8)) == expected


def test_endoftext_in_a_prompt_is_text_unless_special(tiny):
    assert run_json("-m", tiny, "-p", "<|endoftext|>", "-n", 1)["prompt_tokens"] == [27, 91, 437, 1659, 5239, 91, 29]
    assert run_json("-m", tiny, "-p", "<|endoftext|>", "-n", 1, "--special")["prompt_tokens"] == [llorch.EOT_TOKEN]


def test_normal_mode_prints_timings_to_stderr(tiny):
    code, out, err = run_cli("-m", tiny, "-p", PROMPT, "-n", 4)
    assert code == 0 and out.endswith("\n") and out.count("\n") == 1   # with 2>&1 the timings start a line
    for said in ("load time", "prompt eval time", "time to first token", "eval time", "tokens per second",
                 "stop reason      = max_tokens (4 new tokens)"):
        assert said in err


def test_trace_has_every_checkpoint_of_every_pass_and_matches_hf(tiny, tmp_path):
    trace_dir, hf_dir = tmp_path / "llorch", tmp_path / "hf"
    result = run_json("-m", tiny, "-p", PROMPT, "-n", 3, "--trace", trace_dir)
    passes = range(3)   # the prompt pass, then one pass per token but the last
    expected_keys = [checkpoint_key(name, layer, step) for step in passes
                     for name, layer in forward_order(SHAPES["tiny"].n_layer)]
    rows = [json.loads(line) for line in (trace_dir / "trace.jsonl").read_text().splitlines()]
    assert [row["key"] for row in rows] == expected_keys
    assert all((trace_dir / f"{key}.npy").exists() for key in expected_keys)
    assert [int(np.load(trace_dir / f"s{step}.next_token.npy")[0]) for step in passes] == result["tokens"]

    with DirectoryTracer(hf_dir) as hf_tracer:
        run_trace(build_reference("hf", tiny), result["prompt_tokens"], result["tokens"][:-1], tracer=hf_tracer)
    compared = subprocess.run(console_script("llorch-compare", "llorch.compare") + [trace_dir, hf_dir],
                              capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_offline_commands(directory: str) -> list[str]:
    """The README's set-up line without its `pip install .` (this package is installed already), writing
    the random checkpoint to `directory` instead of /tmp/gpt2-random."""
    with open(README, encoding="utf-8") as f:
        line = next(line for line in f if "python -m llorch.testing" in line)
    commands = [command.strip() for command in line.split("&&")]
    return [command.replace("/tmp/gpt2-random", directory) for command in commands
            if not command.startswith("pip install")]


def test_readme_offline_path_works_as_written(tmp_path):
    commands = readme_offline_commands(str(tmp_path / "gpt2-random"))
    assert len(commands) == 2 and commands[1].startswith("llorch-run ")
    for command in commands:
        done = subprocess.run(command, shell=True, env=TEST_ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}: {done.stderr}"
    assert done.stdout   # the generated text


def test_version_and_build_info():
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"llorch-run {llorch.__version__}"
    code, out, _ = run_cli("--build-info")
    assert code == 0 and {"version", "compiler", "openmp", "max_threads", "simd_selected"} <= set(json.loads(out))


# --- bad input ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs_dir(tmp_path_factory, tiny):
    """Broken models and prompt files, by name."""
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt").mkdir()
    shutil.copyfile(os.path.join(tiny, "config.json"), root / "corrupt" / "config.json")
    header = b"{not json}"
    (root / "corrupt" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    shutil.copytree(tiny, root / "bad_config")
    (root / "bad_config" / "config.json").write_text("{")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    return root


BAD_INPUTS = {
    "missing model": (["-m", "{bad}/missing", "-p", "Hi"], "llorch-run: error: {bad}/missing: no such file or directory\n"),
    "corrupt model": (["-m", "{bad}/corrupt", "-p", "Hi"], "header is not JSON"),
    "corrupt config": (["-m", "{bad}/bad_config", "-p", "Hi"], "config.json: not valid JSON"),
    "prompt too long": (["-m", "{tiny}", "-p", "Hi " * 100, "-n", 40], "exceeds the context of 128 positions"),
    "n < 1": (["-m", "{tiny}", "-p", "Hi", "-n", 0], "--max-new-tokens: expected an integer >= 1"),
    "negative temperature": (["-m", "{tiny}", "-p", "Hi", "--temperature", -0.5], "temperature must be"),
    "top-p 0": (["-m", "{tiny}", "-p", "Hi", "--top-p", 0], "top_p must be in (0, 1]"),
    "top-p > 1": (["-m", "{tiny}", "-p", "Hi", "--top-p", 1.01], "top_p must be in (0, 1]"),
    "negative top-k": (["-m", "{tiny}", "-p", "Hi", "--top-k", -1], "top_k must be a non-negative integer"),
    "negative seed": (["-m", "{tiny}", "-p", "Hi", "--seed", -1], "--seed: expected an integer >= 0"),
    "unknown flag": (["-m", "{tiny}", "-p", "Hi", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "missing flag value": (["-m", "{tiny}", "-p"], "argument -p/--prompt: expected one argument"),
    "empty prompt": (["-m", "{tiny}", "-p", ""], "the prompt is empty"),
    "empty prompt file": (["-m", "{tiny}", "-f", "{bad}/empty.txt"], "the prompt is empty"),
    "empty stdin": (["-m", "{tiny}"], "the prompt is empty"),
    "unreadable prompt file": (["-m", "{tiny}", "-f", "{bad}/absent.txt"], "cannot read prompt file"),
    "prompt file not UTF-8": (["-m", "{tiny}", "-f", "{bad}/latin1.txt"], "not valid UTF-8 (byte 0xe9 at offset 3)"),
    "prompt ids not numbers": (["-m", "{tiny}", "--prompt-ids", "1,two"], "'two' is not a token id"),
    "prompt id outside vocab": (["-m", "{tiny}", "--prompt-ids", "1,50257"], "token id 50257 is outside"),
    "two prompt sources": (["-m", "{tiny}", "-p", "Hi", "--prompt-ids", "1"], "not allowed with argument"),
    "threads 0": (["-m", "{tiny}", "-p", "Hi", "--threads", 0], "--threads: expected an integer >= 1 or \"auto\", got '0'"),
    "empty stop string": (["-m", "{tiny}", "-p", "Hi", "--stop", ""], "stop strings must not be empty"),
    "draft while sampling": (["-m", "{tiny}", "-p", "Hi", "--draft", "lookup", "--temperature", 0.8],
                             'draft="lookup" needs greedy decoding'),
    "draft while tracing": (["-m", "{tiny}", "-p", "Hi", "--draft", "lookup", "--trace", "{bad}/trace"],
                            "a traced run cannot draft"),
    "unknown draft": (["-m", "{tiny}", "-p", "Hi", "--draft", "model"], "invalid choice: 'model'"),
    "trace dir not writable": (["-m", "{tiny}", "-p", "Hi", "--trace", "{bad}/empty.txt/trace"],
                               "cannot write the trace to {bad}/empty.txt/trace"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, tiny, bad_inputs_dir):
    args, message = BAD_INPUTS[case]
    places = {"tiny": tiny, "bad": bad_inputs_dir}
    code, out, err = run_cli(*(a.format(**places) if isinstance(a, str) else a for a in args))
    assert code == 2 and out == ""
    assert err.startswith("llorch-run: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert message.format(**places) in err


def test_a_padded_vocabulary_generates_only_ids_the_tokenizer_has(padded_checkpoint):
    prompt = enc.encode(PROMPT)
    expected = list(llorch.generate(llorch.load(padded_checkpoint), prompt, 8))
    assert max(expected) < enc.n_vocab
    result = run_json("-m", padded_checkpoint, "-p", PROMPT, "-n", 8)
    assert result["tokens"] == expected and result["text"] == enc.decode(expected)
    assert run_cli("-m", padded_checkpoint, "-p", PROMPT, "-n", 8)[1] == result["text"] + "\n"
    sampled = run_json("-m", padded_checkpoint, "-p", PROMPT, "-n", 8, "--temperature", 1, "--seed", 0)["tokens"]
    assert max(sampled) < enc.n_vocab


@pytest.mark.parametrize("options", [[], ["--json"], ["--temperature", 0.9]])
def test_overflowing_activations_exit_2_naming_the_position(overflowing_checkpoint, options):
    code, out, err = run_cli("-m", overflowing_checkpoint, "-p", "Hello world", "-n", 4, *options)
    assert code == 2 and out.strip() == ""
    assert err == "llorch-run: error: non-finite logits at position 1: the model's activations overflowed\n"


def test_overflowing_activations_traced_name_the_first_non_finite_checkpoint(overflowing_checkpoint, tmp_path):
    code, _, err = run_cli("-m", overflowing_checkpoint, "-p", "Hello world", "-n", 4, "--trace", tmp_path)
    assert code == 2 and err.endswith("position 1: the model's activations overflowed; "
                                      "the first non-finite checkpoint is s0.h0.mlp.proj\n")
    assert np.isfinite(np.load(tmp_path / "s0.h0.mlp.gelu.npy")).all()
    assert not np.isfinite(np.load(tmp_path / "s0.h0.mlp.proj.npy")).all()


def test_the_first_load_shows_its_progress_on_a_terminal(checkpoint, tmp_path):
    """stderr a terminal (a pseudo-terminal here) and an empty weight cache: the preparing and the caching
    of the weights are shown on one line, erased before the output; a pipe gets none of it."""
    path = checkpoint("odd")
    env = {**TEST_ENV, "LLORCH_CACHE_DIR": str(tmp_path / "cache")}
    leader, follower = pty.openpty()
    process = subprocess.Popen(LLORCH_RUN + ["-m", path, "-p", PROMPT, "-n", "2"], env=env,
                               stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    try:
        while chunk := os.read(leader, 4096):
            shown += chunk
    except OSError:   # EIO: the process closed the terminal
        pass
    finally:
        os.close(leader)
    assert process.wait(60) == 0
    text = shown.decode()
    assert "llorch-run: preparing the weights: 100% of" in text and "llorch-run: caching the prepared weights: 100%" in text
    assert "\r\033[K" + "load time" in text.replace("\r\n", "\n")   # erased before the summary
    code, _, err = run_cli("-m", path, "-p", PROMPT, "-n", 2, env={"LLORCH_CACHE_DIR": str(tmp_path / "piped")})
    assert code == 0 and "preparing" not in err


def test_no_prompt_from_a_terminal_is_an_error(tiny):
    """With no prompt option and stdin a terminal, llorch-run says what to give instead of waiting."""
    leader, follower = pty.openpty()
    try:
        code, _, err = run_cli("-m", tiny, stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert code == 2 and "no prompt: give -p PROMPT, -f FILE or --prompt-ids" in err


def test_ctrl_c_exits_130_quietly(checkpoint):
    # a child would inherit an ignored SIGINT (a script's background job ignores it) and run to the end;
    # a handled one is reset to the default at exec, and Python then turns it into KeyboardInterrupt
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(LLORCH_RUN + ["-m", checkpoint("gpt2"), "-p", PROMPT, "-n", "500"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=TEST_ENV)
    finally:
        signal.signal(signal.SIGINT, inherited)
    process.stdout.read(1)   # the first generated text: generation is under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err == b""
