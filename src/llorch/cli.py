"""llorch-run: a prompt in, GPT-2's continuation streamed to stdout (docs/specs/12-cli.md).

    llorch-run -m gpt2 -p "The capital of France is" -n 16

Exit codes: 0 done; 2 bad input of any kind (model, prompt, options), one line on stderr; 1 an internal
error (the traceback with LLORCH_DEBUG=1); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Callable

import llorch
from llorch.console import EXIT_INTERRUPTED, ArgumentParser, int_at_least, internal_error, thread_count, token_ids
from llorch.generate import DRAFTS, NonFiniteError, Session, check_draft, run as run_session
from llorch.hub import resolve_model
from llorch.runtime import threads_beyond_cpus, warn
from llorch.sampling import Sampler
from llorch.stream import StopStrings
from llorch.trace import DirectoryTracer

PROG = "llorch-run"

EPILOG = """\
prompt: -p PROMPT, -f FILE (-f -: standard input) or, with neither, standard input (one trailing newline
of a file or of stdin is dropped). Prompts must be UTF-8. "<|endoftext|>" in a prompt is plain text unless
--special is given.

output: the continuation is streamed to stdout as it is generated, then one newline. The prompt is not
echoed (so stdout is exactly the generated text and a newline, for scripts); --display-prompt echoes it
first, as llama-cli does. Load time, speeds and the stop reason go to stderr, and on a terminal the first
load's progress. --json prints one JSON object instead: model, prompt_tokens, tokens, text, stop_reason
(max_tokens | eos | stop), seed (the sampler's, drawn when --seed is not given, so that --seed SEED
repeats the run; null when greedy) and timings.

sampling: greedy unless --temperature > 0; --top-k, --top-p and --seed alone only warn that they have no
effect.

stopping: after N tokens, at <|endoftext|> (unless --ignore-eos; it is not printed), or at a --stop string,
which may span tokens: the text ends before it, and tokens include the one that completed it.

MODEL: a Hugging Face GPT-2 directory, a .safetensors file with config.json beside it, or a hub id (gpt2,
gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, openai-community/...) looked up in the Hugging Face cache
($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), else downloaded when huggingface_hub is
installed (pip install 'llorch[hub]') and HF_HUB_OFFLINE is unset. Offline, a seeded random checkpoint at
GPT-2's shape: python -m llorch.testing gpt2 /tmp/gpt2-random, then -m /tmp/gpt2-random.

threads: --threads N, else LLORCH_NUM_THREADS, else OMP_NUM_THREADS, else auto (also --threads auto): the CPUs
this process may use (affinity, cgroup quota) minus those other processes keep busy, checked a few times a
second; the output is the same for any count. More than the CPUs available warns.
exit codes: 0 done, 2 bad input (one line on stderr; a model whose activations overflow into non-finite
logits too), 1 internal error (LLORCH_DEBUG=1 shows the traceback), 130 interrupted.
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Generate text with GPT-2 in FP32 on the CPU.", epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="gpt2", help="directory, .safetensors file or hub id (default: gpt2)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", help="the prompt text")
    prompt.add_argument("-f", "--file", help="read the prompt from this UTF-8 file (-: standard input)")
    prompt.add_argument("--prompt-ids", type=token_ids, metavar="ID,ID,...", help="the prompt as token ids")
    parser.add_argument("-n", "--max-new-tokens", type=int_at_least(1), default=32, metavar="N",
                        help="tokens to generate at most (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 picks the most likely token (default); > 0 samples")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set of probability >= P")
    parser.add_argument("--seed", type=int_at_least(0), metavar="S", help="sampler seed: same seed, same text")
    parser.add_argument("--draft", choices=DRAFTS,
                        help="greedy only: draft tokens by looking the last words up in the text so far, and "
                             "verify them in one pass (same tokens, faster where the text repeats itself)")
    parser.add_argument("--threads", type=thread_count, metavar="N|auto",
                        help="threads for the kernels (default: auto, see below)")
    parser.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR",
                        help="stop before this text (repeatable)")
    parser.add_argument("--special", action="store_true", help='read "<|endoftext|>" in the prompt as token 50256')
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="print the text once, at the end")
    parser.add_argument("--display-prompt", action="store_true", help="echo the prompt before the continuation")
    parser.add_argument("--trace", metavar="DIR", help="write the checkpoint trace of the run to DIR")
    parser.add_argument("--version", action="version", version=f"%(prog)s {llorch.__version__}")
    parser.add_argument("--build-info", action="store_true", help="print the build's compiler, OpenMP and SIMD facts")
    return parser


def read_prompt(args: argparse.Namespace, encoding) -> tuple[str, list[int]]:
    """(prompt text, prompt ids) from -p, -f, --prompt-ids or stdin; ValueError says what is wrong."""
    if args.prompt_ids is not None:
        return encoding.decode(args.prompt_ids), args.prompt_ids
    if args.prompt is not None:
        text = utf8_prompt(os.fsencode(args.prompt), "the -p prompt")
    elif args.file is not None and args.file != "-":
        try:
            with open(args.file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"cannot read prompt file {args.file}: {e.strerror}") from None
        text = drop_final_newline(utf8_prompt(raw, f"prompt file {args.file}"))
    elif sys.stdin is None or (args.file is None and sys.stdin.isatty()):
        raise ValueError("no prompt: give -p PROMPT, -f FILE or --prompt-ids, or pipe the prompt to stdin")
    else:
        text = drop_final_newline(utf8_prompt(sys.stdin.buffer.read(), "the prompt on stdin"))
    if not text:
        raise ValueError("the prompt is empty")
    return text, encoding.encode(text, allowed_special="all" if args.special else set(), disallowed_special=())


def utf8_prompt(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None


def drop_final_newline(text: str) -> str:
    return text[:-1].removesuffix("\r") if text.endswith("\n") else text


class ProgressLine:
    """The load's progress (llorch.load's progress callback) on one stderr line, rewritten in place and
    erased at the end: the first load of a checkpoint prepares its weights and caches them, which takes
    seconds."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        sys.stderr.write(f"\r\033[K{PROG}: {stage}: {done / total:4.0%} of {total / 1e6:,.0f} MB")
        sys.stderr.flush()
        self.shown = True

    def erase(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")


def load_model(model_path: str, show_progress: bool) -> llorch.GPT2:
    """llorch.load, its progress shown on stderr when show_progress (stderr is a terminal)."""
    if not show_progress:
        return llorch.load(model_path)
    progress = ProgressLine()
    try:
        return llorch.load(model_path, progress=progress)
    finally:
        progress.erase()


def model_error(model: str, error: llorch.CheckpointError) -> str:
    """The message for a model that cannot be loaded, naming it once: most errors already start with its path."""
    message = str(error)
    return message if message.startswith(model) else f"model {model}: {message}"


def run_generation(model: llorch.GPT2, session: Session, show: Callable[[str], None], tracer=None,
                   draft: str | None = None) -> float:
    """Run the session, passing each piece of text to show as soon as it is released, then a newline however
    it ends (so that the text never runs into what follows on the terminal). Returns when the prompt pass
    started (perf_counter)."""
    started = time.perf_counter()
    try:
        for step in run_session(model, session, tracer, draft=draft):
            show(step.text)
    except KeyboardInterrupt:
        show(session.flush())   # the text held back
        raise
    finally:
        show("\n")
    return started


@dataclass
class Timings:
    load_s: float
    ttft_s: float             # the prompt pass and the first token's sampling
    prefill_tok_s: float
    decode_tok_s: float | None   # None when one token was generated: no decode step was timed

    @classmethod
    def of(cls, load_s: float, started: float, run: Session) -> "Timings":
        ttft = run.first_token_at - started
        n_decoded = len(run.tokens) - 1
        decode_tok_s = n_decoded / (run.last_token_at - run.first_token_at) if n_decoded else None
        return cls(load_s, ttft, len(run.prompt_ids) / ttft, decode_tok_s)

    def summary(self, run: Session) -> str:
        """llama.cpp's performance lines: load, prompt eval (up to the first token), eval (one pass per token)."""
        lines = [f"load time        = {self.load_s * 1e3:10.2f} ms",
                 f"prompt eval time = {self.ttft_s * 1e3:10.2f} ms / {len(run.prompt_ids):5d} tokens "
                 f"({self.prefill_tok_s:8.2f} tokens per second, time to first token)"]
        if self.decode_tok_s is not None:
            decode_ms, n_decoded = (run.last_token_at - run.first_token_at) * 1e3, len(run.tokens) - 1
            lines.append(f"eval time        = {decode_ms:10.2f} ms / {n_decoded:5d} tokens "
                         f"({self.decode_tok_s:8.2f} tokens per second)")
        lines.append(f"stop reason      = {run.stop_reason.value} ({len(run.tokens)} new tokens)")
        return "\n".join(lines) + "\n"


def write_stdout(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def run(args: argparse.Namespace, parser: ArgumentParser) -> int:
    if args.threads:
        if args.threads != "auto" and (too_many := threads_beyond_cpus(args.threads)) is not None:
            warn(f"--threads {args.threads} {too_many}", PROG)
        llorch.set_num_threads(args.threads)
    if args.build_info:
        print(json.dumps(llorch.build_info(), indent=2))
        return 0
    encoding = llorch.tokenizer()
    try:   # every check that needs no model, before a large checkpoint is loaded
        prompt_text, prompt_ids = read_prompt(args, encoding)
        # an unseeded sampled run draws its seed, so that --json can record it
        seed = args.seed if args.seed is not None or args.temperature == 0 else secrets.randbits(63)
        sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed)
        check_draft(args.draft, sampler, traced=bool(args.trace))
        StopStrings.check(args.stop)
    except ValueError as e:
        parser.error(str(e))
    if args.temperature == 0:
        unused = [option for option, value in (("--top-k", args.top_k), ("--top-p", args.top_p),
                                               ("--seed", args.seed)) if value is not None]
        if unused:
            warn(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without --temperature > 0: "
                 "decoding is greedy", PROG)

    load_started = time.perf_counter()
    try:
        model_path = resolve_model(args.model)
        model = load_model(model_path, show_progress=sys.stderr.isatty())
    except llorch.CheckpointError as e:
        parser.error(model_error(args.model, e))
    load_s = time.perf_counter() - load_started

    eos_token_id = None if args.ignore_eos else llorch.EOT_TOKEN
    streaming = args.stream and not args.json
    with ExitStack() as cleanup:
        tracer = None
        if args.trace:
            try:
                tracer = cleanup.enter_context(DirectoryTracer(args.trace))
            except OSError as e:
                parser.error(f"cannot write the trace to {args.trace}: {e.strerror}")
        try:
            session = Session(model, prompt_ids, args.max_new_tokens, sampler, eos_token_id=eos_token_id,
                              stop=args.stop)
        except ValueError as e:   # a ContextError, or prompt ids outside a smaller model's vocabulary
            parser.error(str(e))
        if streaming and args.display_prompt:
            write_stdout(prompt_text)
        try:
            started = run_generation(model, session, write_stdout if streaming else lambda piece: None, tracer,
                                     args.draft)
        except NonFiniteError as e:   # the checkpoint's fault: bad input
            parser.error(str(e))
    timings = Timings.of(load_s, started, session)

    if args.json:
        result = {"model": model_path, "prompt_tokens": prompt_ids, "tokens": session.tokens,
                  "text": session.text, "stop_reason": session.stop_reason.value,
                  "seed": seed if args.temperature > 0 else None, "timings": asdict(timings)}
        print(json.dumps(result, ensure_ascii=False))
        return 0
    if not streaming:
        write_stdout((prompt_text if args.display_prompt else "") + session.text + "\n")
    sys.stderr.write(timings.summary(session))
    return 0


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(encoding="utf-8")   # model text is UTF-8 whatever the locale, as llama-cli prints it
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, parser)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader left (`llorch-run ... | head -c 20`): stop quietly, and send the flush at exit to
        # /dev/null instead of failing on the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1   # as Python itself exits when its output pipe closes
    except Exception as e:   # a bug, not bad input (bad input exited 2 above)
        return internal_error(PROG, e)


if __name__ == "__main__":
    sys.exit(main())
