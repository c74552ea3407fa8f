"""Command line: one small function per verb, parsing only; the work lives in the library.

Exit codes: 0 success, 2 user error (bad config, data, arguments), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .errors import UserError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _generation_settings(args):
    from .generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    ).validate()


def cmd_train(args) -> int:
    from .log import is_rank0
    from .training import train
    from .training.signals import Interrupted

    if args.resume is None and args.config is None:
        raise UserError("tunelab train needs a CONFIG.yaml (or --resume RUN)")
    if args.nproc is not None:
        return _relaunch(args.nproc)
    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).is_dir():
        overrides.insert(0, args.resume)  # `--resume key=value`: a bare --resume followed by an override
        args.resume = "latest"
    if args.resume == "latest":  # `--resume` alone: the newest unfinished run of this config's out_dir
        from .config import load_config
        from .training.checkpoint import latest_unfinished_run

        cfg = load_config(args.config, overrides) if args.config else load_config(None, overrides)
        args.resume = latest_unfinished_run(cfg.out_dir)
    elif args.resume is not None and args.config:
        overrides.insert(0, args.config)  # `train --resume RUN key=value`: the first override lands in `config`
    try:
        if args.resume is not None:
            result = train(None, overrides, resume=args.resume, progress=not args.no_progress)
        else:
            result = train(args.config, overrides, progress=not args.no_progress)
    except Interrupted as stop:
        if is_rank0():
            print(str(stop), file=sys.stderr)
        return stop.exit_code
    if is_rank0():
        print(result.run_dir)
    return 0


def _relaunch(nproc: int) -> int:
    """`tunelab train --nproc N ...`: the same command under torchrun, N data-parallel processes."""
    import signal
    import subprocess

    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "tunelab",
        *argv,
    ]
    proc = subprocess.Popen(cmd)
    # SIGTERM (a scheduler's preemption) goes on to torchrun, which passes it to the workers: they finish the
    # step and checkpoint. Ctrl-C already reaches every process of the terminal's group: not sent twice.
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = proc.wait()
    return 128 - code if code < 0 else code


def cmd_generate(args) -> int:
    from .generation import generate_text
    from .loading import load

    settings = _generation_settings(args)  # bad flags fail before the model loads
    model, tokenizer = load(args.run_or_model)
    if args.no_stream:
        print(generate_text(model, tokenizer, args.prompt, settings, system=args.system))
        return 0
    generate_text(
        model,
        tokenizer,
        args.prompt,
        settings,
        system=args.system,
        on_text=lambda text: print(text, end="", flush=True),
    )
    print()
    return 0


def cmd_chat(args) -> int:
    from .generation import chat_loop
    from .loading import load

    settings = _generation_settings(args)
    model, tokenizer = load(args.run_or_model)
    chat_loop(model, tokenizer, settings, system=args.system)
    return 0


def cmd_eval(args) -> int:
    from .eval.run import evaluate_run

    metrics = evaluate_run(args.run_or_model, args.data, args.overrides, progress=not args.no_progress)
    # a readable table on stderr; the JSON on stdout stays machine-readable
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:32s} {value:.4f}", file=sys.stderr)
        elif isinstance(value, int):
            print(f"  {key:32s} {value}", file=sys.stderr)
    for kind, key in (("note", "eval_generation_notes"), ("warning", "eval_generation_warnings")):
        for line in metrics.get(key, []):
            print(f"  {kind}: {line}", file=sys.stderr)
    print(f"  {'scale':32s} {metrics['scale']} (exact match, BLEU, ROUGE, accuracy, F1)", file=sys.stderr)
    written = metrics["written"]
    print(f"wrote {', '.join(written)}" if written else "no files written (not a single run)", file=sys.stderr)
    _print_json(metrics)
    return 0


def cmd_data_check(args) -> int:
    from .data.check import check_file
    from .models import load_tokenizer

    report = check_file(args.file, load_tokenizer(args.model), args.format, args.max_length)
    _print_json(report)
    if report["invalid"]:
        print(
            f"error: {args.file}: {report['invalid']} of {report['records']} records are invalid; the first: "
            f"{report['problems'][0]}",
            file=sys.stderr,
        )
        return 2
    return 0


def cmd_methods(args) -> int:
    from .config_reference import method_option_lines
    from .methods import METHODS
    from .methods.catalog import method_table

    rows = method_table(args.model, args.task)
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        line = f"{r['method']:9s} {r['artifact']:9s} lr {r['default_lr']:<7g} {r['summary']}"
        if "trainable_params" in r:
            line += (
                f"\n{'':9s} trainable {r['trainable_params']:,} / {r['total_params']:,} ({r['trainable_pct']:.3f}%),"
                f" artifact ~{r['artifact_bytes_est'] / 2**20:.2f} MiB"
            )
        print(line)
        for option in method_option_lines(METHODS[r["method"]]):
            print(f"{'':9s} {option}")
    return 0


def cmd_runs(args) -> int:
    from .runs import list_runs

    rows = list_runs(args.dir)
    if not rows:
        print(f"no runs under {args.dir}")
        return 0
    for r in rows:
        line = (
            f"{r['run']:40s} {r['status']:11s} {r['method'] or '-':8s} {r['model'] or '-':24s} "
            f"loss={r['final_train_loss']} eval={r['eval_loss']} hash={r['config_hash']}"
        )
        print(line + (f"  ({r['detail']})" if r["detail"] else ""))
    return 0


def cmd_demo(args) -> int:
    if args.task == "triage":
        from .demo.triage import run_triage_benchmark

        run_triage_benchmark(args.out_dir)
        return 0
    if args.task == "preference":
        from .demo.preference import run_preference_demo

        run_preference_demo(out_dir=args.out_dir, steps=args.steps)
        return 0
    from .demo.run import run_demo

    run_demo(out_dir=args.out_dir, steps=args.steps)
    return 0


def cmd_bench(args) -> int:
    from .bench.run import run_bench

    report = run_bench(model=args.model, steps=args.steps, quick=args.quick, out=args.out)
    _print_json(report)
    return 0


def _add_generation_flags(p) -> None:
    from .generation import SAMPLING_REPETITION_PENALTY, GenerationSettings

    p.add_argument("--max-new-tokens", type=int, default=GenerationSettings().max_new_tokens)
    defaults = GenerationSettings()  # one home for the defaults
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = plain greedy")
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--top-k", type=int, default=defaults.top_k)
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help=f"default: {SAMPLING_REPETITION_PENALTY} when sampling, none when greedy",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--system", default=None, help="system prompt (default: the run's data.system_prompt, else the template's)"
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tune language models efficiently.")
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML config; prints the run directory")
    p.add_argument("config", nargs="?", help="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument(
        "--resume",
        metavar="RUN",
        nargs="?",
        const="latest",
        help="continue RUN (default: the newest unfinished run) from its latest complete checkpoint",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="data-parallel over N processes (torchrun; same as `accelerate launch -m tunelab train ...`)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="one completion from a run or a model")
    p.add_argument("run_or_model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("run_or_model")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="evaluate a run or model on its validation data or --data FILE")
    p.add_argument("run_or_model")
    p.add_argument(
        "--data", help="a data file (default: the run's validation split); writes RUN/eval-<stem>.json, not eval.json"
    )
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    c = data_sub.add_parser("check", help="validate a data file; counts, token lengths, problems")
    c.add_argument("file")
    c.add_argument("--format", default="auto")
    c.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and chat template to use")
    c.add_argument("--max-length", type=int, default=512)
    c.set_defaults(func=cmd_data_check)

    p = sub.add_parser("methods", help="list tuning methods with their config blocks and defaults")
    p.add_argument("--model", help="also count trainable/total params and artifact size on this model")
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "classification"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("runs", help="list runs with method, model, metrics, config hash")
    p.add_argument("dir", nargs="?", default="runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("demo", help="the README demo: before/after LoRA on a generated date-normalisation task")
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument(
        "--task",
        choices=["dates", "triage", "preference"],
        default="dates",
        help="dates: LoRA on smollm2 (causal LM); triage: LoRA q/v classification on minilm-l6; preference: DPO "
        "on smollm2 from a small SFT adapter",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench", help="tunelab's fast path vs a transformers Trainer + peft baseline, measured in the same run; JSON"
    )
    p.add_argument("--quick", action="store_true", help="a few steps (under 3 minutes on 2 CPU cores) instead of 30")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per phase, the first one a warm-up")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops a positional list at the first flag: `train c.yaml --no-progress lr=1` leaves `lr=1` over
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
