"""llorch-validate: llorch against independent references on your own weights, checkpoint by checkpoint.

    llorch-validate -m gpt2-medium -p "Hello." --greedy 10 --expect "Hello. I'm a little late to the party, but"

llorch and each chosen reference (llorch.references) run the same input: the prompt pass, then N decode
steps teacher-forced with llorch's greedy continuation, so both sides see identical ids even where their
argmaxes would differ. Every checkpoint of every pass is compared with the checkpoint table's tolerance
(llorch.trace, docs/specs/13), shapes first. Then K greedy tokens are compared with HF transformers'
`generate`, and with --expect the prompt and its greedy continuation must equal a given text.

Exit codes: 0 everything passes, 1 something fails (or an internal error), 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import llorch
from llorch.console import EXIT_INTERRUPTED, ArgumentParser, int_at_least, internal_error, token_ids
from llorch.compare import Row, compare_traces, first_failure
from llorch.hub import resolve_model
from llorch.references import DECODE_IDS, INSTALL, PROMPT_IDS, REFERENCES, MissingFramework, build, require
from llorch.trace import BY_NAME, DirectoryTracer, OneSequence, Tracer, json_number, parse_key, run_trace

PROG = "llorch-validate"
SCHEMA = "llorch-validate/1"
DEFAULT_REFERENCES = ("hf", "numpy64")
REFERENCE_FILES = ("config.json", "model.safetensors")   # what every reference reads from the directory

EPILOG = f"""\
MODEL: a Hugging Face GPT-2 directory (config.json + model.safetensors; F32, F16 or BF16 weights, which
every implementation widens to the same FP32 values), its model.safetensors, or a hub id found in the
Hugging Face cache or downloaded, as for llorch-run. --reference-model gives the references another
checkpoint than llorch (for example the original of a converted one): the report then shows where the two part.

prompt: -p TEXT or --prompt-ids ID,ID,...; with neither, the test suite's prompt {list(PROMPT_IDS)}
("Hello, I'm a language model,").

references: hf (HF transformers' GPT2LMHeadModel with forward hooks; pip install 'llorch[validate]'),
tinygrad ({INSTALL['tinygrad']}), numpy64 (a float64 numpy oracle: needs 8 bytes per parameter of memory).
A checkpoint passes when max|llorch - ref| <= atol + rtol * max|ref| (rtol 5e-5, atol 1e-6; embed rtol 1e-5;
next_token exact): honest FP32 stays within 6e-6 * max|ref| of the float64 oracle.

--json prints one object (docs/specs/15-validate.md), schema "{SCHEMA}":
  passed, model, reference_model, prompt_ids, decode_ids,
  references: [{{name, passed, compared, passed_count, worst_rel, worst_key, first_failure, failures}}]
    (first_failure and each failure: key, name, layer, step, status, max_abs, max_rel, tolerance),
  greedy: null or {{n, llorch, hf, passed, text}}, expect: null or {{text, passed}}.

exit codes: 0 everything passes, 1 a checkpoint, the greedy tokens or --expect fail (or an internal
error; LLORCH_DEBUG=1 shows its traceback), 2 bad input (one line on stderr).
"""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Check llorch against HF transformers, tinygrad and a float64 "
                            "oracle on your weights, checkpoint by checkpoint.", epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="directory, model.safetensors file or hub id")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("-p", "--prompt", help="the prompt text")
    prompt.add_argument("--prompt-ids", type=token_ids, metavar="ID,ID,...", help="the prompt as token ids")
    parser.add_argument("--reference", type=reference_names, default=list(DEFAULT_REFERENCES), metavar="NAMES",
                        help=f"comma-separated, from {','.join(REFERENCES)} (default: {','.join(DEFAULT_REFERENCES)})")
    parser.add_argument("--reference-model", metavar="MODEL", help="the references' checkpoint (default: MODEL)")
    parser.add_argument("--decode-steps", type=int_at_least(0), default=len(DECODE_IDS), metavar="N",
                        help=f"teacher-forced decode passes after the prompt pass (default: {len(DECODE_IDS)})")
    parser.add_argument("--greedy", type=int_at_least(0), default=10, metavar="K",
                        help="greedy tokens to compare with HF generate (default: 10; 0: none)")
    parser.add_argument("--expect", metavar="TEXT", help="the prompt and its K greedy tokens must read TEXT")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--plot", metavar="PNG", help="plot the relative error per checkpoint per reference")
    parser.add_argument("--trace-dir", metavar="DIR", help="write DIR/llorch and DIR/<reference> traces "
                        "(for llorch-compare DIR/llorch DIR/hf)")
    return parser


def reference_names(value: str) -> list[str]:
    """--reference: comma-separated names of REFERENCES, each once."""
    names = list(dict.fromkeys(value.split(",")))
    unknown = [name for name in names if name not in REFERENCES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown reference {unknown[0]!r} (expected some of {','.join(REFERENCES)})")
    return names


def checkpoint_dir(model: str, option: str) -> str:
    """The directory every reference reads, for MODEL: ValueError naming the option if there is none."""
    try:
        path = resolve_model(model)
    except llorch.CheckpointError as e:   # neither a path nor a hub id whose weights could be found or fetched
        raise ValueError(f"{option} {model}: {e}") from None
    if not os.path.exists(path):
        raise ValueError(f"{option} {model}: no such file or directory")
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and os.path.basename(path) != "model.safetensors":
        raise ValueError(f"{option} {model}: the references read a directory's model.safetensors; "
                         f"pass the directory holding {os.path.basename(path)} under that name")
    missing = [name for name in REFERENCE_FILES if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise ValueError(f"{option} {model}: {directory} has no {' or '.join(missing)} (the references read both)")
    return directory


class KeepingTracer(Tracer):
    """Keeps every checkpoint in memory and, given a directory, also writes it there as llorch-run --trace does."""

    def __init__(self, directory: str | None) -> None:
        super().__init__()
        self.files = DirectoryTracer(directory) if directory else None

    def start_forward(self, start_pos: int, n_tokens: int) -> None:
        super().start_forward(start_pos, n_tokens)
        if self.files:
            self.files.start_forward(start_pos, n_tokens)

    def record(self, name: str, layer: int | None, value) -> None:
        super().record(name, layer, value)
        if self.files:
            self.files.record(name, layer, value)

    def close(self) -> None:
        if self.files:
            self.files.close()


def traced(model, directory: str | None, prompt_ids: list[int], decode_ids: list[int]) -> Tracer:
    tracer = KeepingTracer(directory)
    try:
        run_trace(model, prompt_ids, decode_ids, tracer)
    finally:
        tracer.close()
    return tracer


def row_json(row: Row) -> dict:
    name, layer, step = parse_key(row.key)
    number = lambda x: None if x is None else json_number(x)  # noqa: E731
    return {"key": row.key, "name": name, "layer": layer, "step": step, "status": row.status,
            "max_abs": number(row.max_abs), "max_rel": number(row.max_rel), "tolerance": number(row.tolerance)}


@dataclass
class ReferenceResult:
    name: str
    rows: list[Row]

    @property
    def passed(self) -> bool:
        return first_failure(self.rows) is None

    def worst(self) -> Row | None:
        """The row with the largest relative error among those whose values were compared."""
        compared = [r for r in self.rows if r.max_rel is not None]
        return max(compared, key=lambda r: r.max_rel, default=None)

    def to_json(self) -> dict:
        worst, first = self.worst(), first_failure(self.rows)
        return {"name": self.name, "passed": self.passed, "compared": len(self.rows),
                "passed_count": sum(r.passed for r in self.rows),
                "worst_rel": None if worst is None else json_number(worst.max_rel),
                "worst_key": None if worst is None else worst.key,
                "first_failure": None if first is None else row_json(first),
                "failures": [row_json(r) for r in self.rows if not r.passed]}


@dataclass
class Greedy:
    n: int
    llorch: list[int]
    hf: list[int] | None     # None when hf is not among the references
    text: str                # the prompt and llorch's continuation (without <|endoftext|>), as tinygrad prints it

    @property
    def passed(self) -> bool | None:
        return None if self.hf is None else self.llorch == self.hf

    def to_json(self) -> dict:
        return {"n": self.n, "llorch": self.llorch, "hf": self.hf, "passed": self.passed, "text": self.text}

    def lines(self) -> list[str]:
        if self.hf is None:
            verdict = f"greedy: {len(self.llorch)} tokens (not compared: hf is not among the references)"
        elif self.passed:
            verdict = f"greedy: {len(self.llorch)} tokens, llorch = HF generate"
        else:
            at = next((i for i, (a, b) in enumerate(zip(self.llorch, self.hf)) if a != b),
                      min(len(self.llorch), len(self.hf)))
            verdict = f"greedy: llorch and HF generate part at token {at}: {self.llorch} vs {self.hf}"
        return [verdict, f"text: {self.text!r}"]


def greedy_prefix(tokens: list[int], n: int) -> list[int]:
    """The first n tokens, ending after the first <|endoftext|> as HF generate stops there."""
    tokens = tokens[:n]
    return tokens[:tokens.index(llorch.EOT_TOKEN) + 1] if llorch.EOT_TOKEN in tokens else tokens


@dataclass
class Validation:
    model_dir: str
    reference_dir: str
    config: llorch.GPT2Config
    prompt_ids: list[int]
    decode_ids: list[int]
    greedy: Greedy | None
    expect: str | None
    results: list[ReferenceResult] = field(default_factory=list)

    @property
    def expect_met(self) -> bool | None:
        return None if self.expect is None else self.greedy.text == self.expect

    @property
    def passed(self) -> bool:
        return (all(r.passed for r in self.results) and (self.greedy is None or self.greedy.passed is not False)
                and self.expect_met is not False)

    def to_json(self) -> dict:
        """The --json report, schema SCHEMA (docs/specs/15-validate.md)."""
        return {"schema": SCHEMA, "passed": self.passed, "model": self.model_dir, "reference_model": self.reference_dir,
                "prompt_ids": self.prompt_ids, "decode_ids": self.decode_ids,
                "references": [r.to_json() for r in self.results],
                "greedy": None if self.greedy is None else self.greedy.to_json(),
                "expect": None if self.expect is None else {"text": self.expect, "passed": self.expect_met}}

    def table(self) -> str:
        """The report for people: one row per reference, then the greedy check and the verdict."""
        config = self.config
        lines = [f"{self.model_dir}: {config.n_layer} layers, n_embd {config.n_embd}, n_head {config.n_head}; "
                 f"prompt pass of {len(self.prompt_ids)} tokens, {len(self.decode_ids)} decode steps; "
                 "each checkpoint passes when max|llorch - ref| <= atol + rtol * max|ref| (docs/specs/13)"]
        rows = [("reference", "compared", "passed", "worst rel", "at", "first divergence")]
        for result in self.results:
            worst = result.worst()
            rows.append((result.name, str(len(result.rows)), str(sum(r.passed for r in result.rows)),
                         "-" if worst is None else f"{worst.max_rel:.2g}", "-" if worst is None else worst.key,
                         divergence(first_failure(result.rows))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        if self.greedy is not None:
            lines += self.greedy.lines()
        if self.expect is not None:
            lines.append("expect: " + ("match" if self.expect_met else f"FAIL, expected {self.expect!r}"))
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def divergence(first: Row | None) -> str:
    """'s0.h1.ln_1 (layer 1, prompt pass: FAIL, rel 0.0099)', or '-' when nothing diverges."""
    if first is None:
        return "-"
    _, layer, step = parse_key(first.key)
    where = ("" if layer is None else f"layer {layer}, ") + ("prompt pass" if step == 0 else f"decode step {step}")
    rel = "" if first.max_rel is None else f", rel {first.max_rel:.3g}"
    return f"{first.key} ({where}: {first.status}{rel})"


def plot_relative_errors(results: list[ReferenceResult], path: str) -> None:
    """The relative error of every checkpoint in forward order, one line per reference, passes marked (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 4.5), layout="constrained")
    floor, ceiling = 1e-12, 1.0   # exact agreement at the bottom; unmatched shapes, infinities and NaN at the top
    for result in results:
        rel = [ceiling if r.max_rel is None or not math.isfinite(r.max_rel) else max(r.max_rel, floor)
               for r in result.rows]
        axes.plot(range(len(rel)), rel, marker=".", markersize=3, linewidth=0.8, label=result.name)
    steps = [parse_key(r.key)[2] for r in results[0].rows]
    for i in range(1, len(steps)):
        if steps[i] != steps[i - 1]:
            axes.axvline(i - 0.5, color="grey", linewidth=0.6)
    axes.axhline(BY_NAME["ln_1"].rtol, color="red", linestyle="--", linewidth=1, label="table rtol")
    axes.set_yscale("log")
    axes.set_xlabel("checkpoint, in forward order (grey lines: prompt pass | decode steps)")
    axes.set_ylabel("max|llorch - ref| / max|ref|")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def checked_input(args: argparse.Namespace) -> tuple[list[int], str, str]:
    """(prompt ids, llorch's checkpoint directory, the references'), after every check that needs no model."""
    if args.prompt_ids is not None:
        prompt_ids = args.prompt_ids
    elif args.prompt is None:
        prompt_ids = list(PROMPT_IDS)
    elif args.prompt:
        prompt_ids = llorch.tokenizer().encode(args.prompt, disallowed_special=())
    else:
        raise ValueError("the prompt is empty")
    if args.expect is not None and args.greedy == 0:
        raise ValueError("--expect needs greedy tokens: give --greedy K with K >= 1")
    for name in args.reference:
        require(name)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            raise ValueError("--plot needs matplotlib: pip install 'llorch[plot]'") from None
    model_dir = checkpoint_dir(args.model, "-m")
    reference_dir = checkpoint_dir(args.reference_model, "--reference-model") if args.reference_model else model_dir
    return prompt_ids, model_dir, reference_dir


def compare_reference(name: str, validation: Validation, ours: Tracer, trace_dir: str | None) -> ReferenceResult:
    """Trace reference `name` on the same ids and compare it with llorch's trace; hf also runs generate for the
    greedy check. The reference's weights are freed on return."""
    reference = build(name, validation.reference_dir)
    theirs = traced(reference, trace_dir, validation.prompt_ids, validation.decode_ids)
    if name == "hf" and validation.greedy is not None:
        from llorch.references.hf import hf_greedy
        validation.greedy.hf = hf_greedy(reference.model, validation.prompt_ids, validation.greedy.n, llorch.EOT_TOKEN)
    return ReferenceResult(name, compare_traces(ours, theirs))


def run(args: argparse.Namespace, parser: ArgumentParser) -> int:
    try:
        prompt_ids, model_dir, reference_dir = checked_input(args)
    except (ValueError, MissingFramework) as e:
        parser.error(str(e))
    try:
        model = llorch.load(model_dir)
    except llorch.CheckpointError as e:
        parser.error(f"model {args.model}: {e}")
    try:   # llorch's greedy continuation: the decode steps' ids, and the tokens compared with HF's
        # (at least one token, which also checks that the prompt fits the context)
        continuation = list(llorch.generate(model, prompt_ids, max(args.decode_steps, args.greedy, 1),
                                            eos_token_id=None))
    except ValueError as e:   # a ContextError, or prompt ids outside a smaller model's vocabulary
        parser.error(str(e))
    greedy = None
    if args.greedy:
        tokens = greedy_prefix(continuation, args.greedy)
        text = llorch.tokenizer().decode(prompt_ids + [t for t in tokens if t != llorch.EOT_TOKEN])
        greedy = Greedy(args.greedy, tokens, None, text)
    validation = Validation(model_dir, reference_dir, model.config, prompt_ids, continuation[:args.decode_steps],
                            greedy, args.expect)

    trace_dir = {name: args.trace_dir and os.path.join(args.trace_dir, name) for name in ["llorch", *args.reference]}
    try:
        ours = traced(OneSequence(model), trace_dir["llorch"], prompt_ids, validation.decode_ids)
    except OSError as e:
        parser.error(f"cannot write the trace to {args.trace_dir}: {e.strerror}")
    del model   # one set of weights in memory at a time
    for name in args.reference:
        validation.results.append(compare_reference(name, validation, ours, trace_dir[name]))

    print(json.dumps(validation.to_json(), indent=1, ensure_ascii=False) if args.json else validation.table())
    if args.plot:
        plot_relative_errors(validation.results, args.plot)
    return 0 if validation.passed else 1


def main(argv: list[str] | None = None) -> int:
    args = (parser := build_parser()).parse_args(argv)
    sys.stdout.reconfigure(encoding="utf-8")   # the greedy text is UTF-8 whatever the locale
    try:
        return run(args, parser)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:   # a bug, not bad input (bad input exited 2 above)
        return internal_error(PROG, e)


if __name__ == "__main__":
    sys.exit(main())
