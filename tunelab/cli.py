"""Command line: one small function per verb, parsing only; the work lives in the library.

Exit codes: 0 success, 2 user error (bad config, data, arguments), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
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
    if args.shard:  # after the config's own keys and the command line's: --shard wins
        overrides.append("train.distributed=fsdp")
    if args.resume is not None and "=" in args.resume and not Path(args.resume).is_dir():
        overrides.insert(0, args.resume)  # `--resume key=value`: a bare --resume followed by an override
        args.resume = "latest"
    if args.resume == "latest":  # `--resume` alone: the newest unfinished run of this config's out_dir
        from .config import load_config
        from .training.checkpoint_dirs import latest_unfinished_run

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
        if args.eval:  # in this process: the modules and the tokenizer are already loaded
            from .eval.run import evaluate_run

            _print_eval_table(evaluate_run(str(result.run_dir), progress=not args.no_progress))
        print(result.run_dir)
    return 0


def cmd_distill(args) -> int:
    from .distill import distill
    from .training.signals import Interrupted

    if args.resume is None and args.config is None:
        raise UserError("tunelab distill needs a CONFIG.yaml with a distill section (or --resume RUN)")
    overrides = list(args.overrides)
    if args.resume is not None and args.config:
        overrides.insert(0, args.config)  # `distill --resume RUN key=value`: the first override lands in `config`
    config = None if args.resume is not None else args.config
    try:
        result = distill(config, overrides, resume=args.resume, progress=not args.no_progress)
    except Interrupted as stop:
        print(str(stop), file=sys.stderr)
        return stop.exit_code
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
    _print_eval_table(metrics)
    _print_json(metrics)
    return 0


def _print_eval_table(metrics: dict) -> None:
    """A readable table on stderr (the JSON on stdout stays machine-readable)."""
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"  {key:32s} {value:.4f}", file=sys.stderr)
        elif isinstance(value, int):
            print(f"  {key:32s} {value}", file=sys.stderr)
    shown = (
        ("note", "eval_generation_notes"),
        ("warning", "eval_generation_warnings"),
        ("warning", "eval_classification_warnings"),
    )
    for kind, key in shown:
        for line in metrics.get(key, []):
            print(f"  {kind}: {line}", file=sys.stderr)
    print(f"  {'scale':32s} {metrics['scale']} (exact match, BLEU, ROUGE, accuracy, F1)", file=sys.stderr)
    written = metrics["written"]
    print(f"wrote {', '.join(written)}" if written else "no files written (not a single run)", file=sys.stderr)


def cmd_data_check(args) -> int:
    from .data.check import check_file
    from .data.doctor import format_report
    from .models import DEFAULT_MODEL, load_tokenizer

    features = None
    if args.model:  # label errors from this model's embeddings instead of TF-IDF
        from .data.label_errors import model_embeddings

        def features(texts):
            return model_embeddings(args.model, texts)

    report = check_file(
        args.file,
        load_tokenizer(args.model or DEFAULT_MODEL),
        args.format,
        args.max_length,
        args.chat_template,
        args.loss_on,
        args.system_prompt,
        eval_path=args.eval,
        label_features=features,
    )
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    if report["invalid"]:
        print(
            f"error: {args.file}: {report['invalid']} of {report['records']} records are invalid; the first: "
            f"{report['problems'][0]}",
            file=sys.stderr,
        )
        return 2
    return 0


def cmd_data_show(args) -> int:
    from .data.show import show_file
    from .models import load_tokenizer

    colour = sys.stdout.isatty() and not args.no_colour
    print(
        show_file(
            args.file,
            load_tokenizer(args.model),
            args.n,
            args.format,
            args.chat_template,
            args.loss_on,
            args.system_prompt,
            args.max_length,
            colour,
        )
    )
    return 0


def cmd_data_clean(args) -> int:
    from .data.clean import clean_file, format_clean_report, report_path

    if not (args.dedup or args.scrub_pii or args.drop_label_errors or args.balance):
        raise UserError("data clean: choose at least one of --dedup, --scrub-pii, --drop-label-errors, --balance")
    report = clean_file(
        args.file, args.out, args.dedup, args.scrub_pii, args.drop_label_errors, args.balance, args.eval, args.seed
    )
    if args.json:
        _print_json(report)
    else:
        print(format_clean_report(report))
        print(f"wrote {args.out} and {report_path(args.out)}", file=sys.stderr)
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
    from .runs import diff_runs, filter_runs, list_runs, remove_runs

    if args.dir == "diff" or args.dir == "rm":
        args.action, args.dir = args.dir, args.runs_dir
    if args.action == "diff":
        if len(args.names) != 2:
            raise UserError("tunelab runs diff RUN_A RUN_B takes two run names")
        _print_json(diff_runs(args.dir, *args.names))
        return 0
    if args.action == "rm":
        if not args.names:
            raise UserError("tunelab runs rm RUN [RUN ...] needs at least one run name")
        for run in remove_runs(args.dir, args.names):
            print(f"removed {run}")
        return 0
    rows = filter_runs(list_runs(args.dir), args.method, args.model, args.since)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no runs under {args.dir}")
        return 0
    for r in rows:
        hp = " ".join(f"{k.split('.')[-1]}={v}" for k, v in r["hyperparameters"].items())
        line = (
            f"{r['run']:40s} {r['date'][:16]} {r['status']:11s} {r['method'] or '-':8s} {r['model'] or '-':24s} "
            f"{hp} loss={r['final_train_loss']} eval={r['eval_loss']} hash={r['config_hash']} "
            f"disk={r['disk_bytes'] / 2**20:.1f}MiB"
        )
        if r["parent"]:
            line += f" parent={r['parent']}"
        print(line + (f"  ({r['detail']})" if r["detail"] else ""))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import SweepOptions, run_sweep
    from .training.signals import Interrupted

    options = SweepOptions(
        config=args.config,
        space=args.space,
        trials=args.trials,
        overrides=list(args.overrides),
        metric=args.metric,
        direction=args.direction,
        jobs=args.jobs,
        pruner=args.pruner,
        name=args.name,
        progress=not args.no_progress,
    )
    try:
        summary = run_sweep(options)
    except Interrupted as stop:
        print(f"{stop}; run the same command again to continue the sweep", file=sys.stderr)
        return stop.exit_code
    best = summary["best"]
    print(f"best: trial {best['trial']} {summary['metric']} {best['value']:.6g} ({best['run']})", file=sys.stderr)
    print(Path(summary["sweep_dir"]) / "best.yaml")
    return 0


def cmd_estimate(args) -> int:
    from .config import load_config
    from .estimate import estimate, method_variant, probe
    from .estimate.report import methods_table, text
    from .methods import METHODS

    prices = {"price_per_hour": args.price_per_hour, "price_per_kwh": args.price_per_kwh}
    for name, price in prices.items():
        if price is not None and not (price >= 0 and math.isfinite(price)):
            raise UserError(f"--{name.replace('_', '-')} {price}: a price is a finite number >= 0")
    cfg = load_config(args.config, args.overrides)
    if args.all_methods:
        names = [n for n in METHODS if n != "qlora" or cfg.task == "causal_lm"]
        reports = [estimate(method_variant(cfg, n), args.nproc, **prices) for n in names]
        _print_json(reports) if args.json else print(methods_table(reports))
        return 0
    report = estimate(cfg, args.nproc, **prices)
    if args.probe:
        report["probe"] = probe(cfg, report)
    _print_json(report) if args.json else print(text(report))
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare

    results = run_compare(
        args.config,
        args.overrides,
        args.methods,
        args.out,
        args.budget_mem,
        args.budget_time,
        args.metric,
        progress=not args.no_progress,
    )
    rec = results["recommendation"]
    print(f"recommended: {rec['method']} ({rec['why']})" if rec["method"] else f"no recommendation: {rec['why']}")
    print(f"wrote {Path(args.out) / 'report.html'}, report.md, results.json")
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


def cmd_export(args) -> int:
    from .export import export_run

    export_run(
        args.run,
        args.out,
        fmt=args.format,
        merge=args.merge,
        quantize=args.quantize,
        prune_layers=args.prune_layers,
        prune=args.prune,
        heal_steps=args.heal_steps,
        prompts=args.prompts,
        max_prompts=args.max_prompts,
        progress=not args.no_progress,
    )
    print(args.out)
    return 0


def cmd_bench(args) -> int:
    from .bench.run import run_bench

    report = run_bench(
        model=args.model,
        steps=args.steps,
        quick=args.quick,
        out=args.out,
        profile=args.profile,
        compile=args.compile,
        sequential=args.sequential,
    )
    _print_json(report)
    return 0


def cmd_serve(args) -> int:
    if args.check is not None:
        from .serve.check import vllm_check

        report = vllm_check(args.check)
        _print_json(report)
        if not report["ready"]:
            print(f"error: {args.check}: not ready for vLLM: {'; '.join(report['problems'])}", file=sys.stderr)
            return 2
        print(report["command"], file=sys.stderr)
        return 0
    from .serve.server import Serving, run_server

    run_server(Serving(_serve_options(args)))
    return 0


def _serve_options(args):
    from .serve.limits import Limits
    from .serve.security import read_api_key
    from .serve.server import ServeOptions

    if args.api_key_file is None and not args.no_auth:
        raise UserError("tunelab serve needs --api-key-file FILE (or --no-auth, to serve without a key)")
    adapters = {}
    for item in args.adapter:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise UserError(f"--adapter {item!r}: expected NAME=RUN")
        if name in adapters:
            raise UserError(f"--adapter {name}: given twice")
        adapters[name] = run
    for flag in ("port", "max_batch_size", "max_queue", "max_concurrency", "max_body_bytes", "max_tokens"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be {'>= 0' if flag == 'port' else '>= 1'}")
    if args.no_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} with --no-auth: anyone who can reach it can use it", file=sys.stderr)
    return ServeOptions(
        base=args.base,
        adapters=adapters,
        adapters_dir=args.adapters_dir,
        host=args.host,
        port=args.port,
        api_key=None if args.no_auth else read_api_key(args.api_key_file),
        limits=Limits(
            max_body_bytes=args.max_body_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            max_concurrency=args.max_concurrency,
        ),
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_lora_rank=args.max_lora_rank,
        mixed_batching=not args.no_mixed_batching,
    )


def cmd_ui(args) -> int:
    from .serve.security import read_api_key
    from .ui.security import LOOPBACK
    from .ui.server import UiOptions, UiServing, run_ui

    if args.host not in LOOPBACK and args.api_key_file is None and not args.no_auth:
        raise UserError(f"tunelab ui --host {args.host} needs --api-key-file FILE (or --no-auth)")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port {args.port}: not a port number (0-65535)")
    key = read_api_key(args.api_key_file) if args.api_key_file else None
    run_ui(UiServing(UiOptions(runs=args.runs or ["runs"], host=args.host, port=args.port, api_key=key)))
    return 0


def cmd_serve_bench(args) -> int:
    from .serve.bench import run_serve_bench

    report = run_serve_bench(
        args.model, args.requests, args.concurrency, args.max_tokens, rounds=args.rounds, out=args.out
    )
    _print_json(report)
    return 0


def _add_serve_flags(p) -> None:
    from .serve.limits import Limits

    limits = Limits()
    p.add_argument("--base", metavar="MODEL_OR_RUN", help="the base model (default: the adapters' base, else smollm2)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN", help="serve RUN's adapter as NAME")
    p.add_argument("--adapters-dir", metavar="DIR", help="serve each sub-folder under its name; watched for changes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--api-key-file", metavar="F", help="clients send this key (Authorization: Bearer KEY)")
    auth.add_argument("--no-auth", action="store_true", help="serve without an API key")
    p.add_argument("--check", metavar="RUN", help="only check that RUN's adapter suits vLLM --lora-modules")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a batch (then 429)")
    p.add_argument("--max-concurrency", type=int, default=limits.max_concurrency, help="requests in flight (then 429)")
    p.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="request body size (then 413)")
    p.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens, help="(then 422)")
    p.add_argument("--max-tokens", type=int, default=limits.max_tokens, help="the largest max_tokens (then 422)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="adapters of a higher rank are refused")
    p.add_argument("--no-mixed-batching", action="store_true", help="one adapter per batch (for comparison)")


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


def _at_least(low: int):
    """An argparse type: an integer >= low (as the config's own bound for the same setting)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {low}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message for a non-number
    return parse


def _add_render_flags(p) -> None:
    p.add_argument("--format", default="auto")
    p.add_argument("--max-length", type=_at_least(8), default=512, help="as data.max_length (at least 8)")
    p.add_argument("--chat-template", default="auto", help="auto (the tokenizer's), chatml, or a Jinja template")
    p.add_argument("--loss-on", default="completion", choices=["completion", "last_turn", "all"])
    p.add_argument("--system-prompt", default=None, help="as data.system_prompt")


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
    p.add_argument(
        "--shard",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the processes (FSDP): train.distributed=fsdp",
    )
    p.add_argument(
        "--eval",
        action="store_true",
        help="then evaluate the run as `tunelab eval RUN` does (generation metrics too), in the same process",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "distill", help="train a student from a teacher (KD: distill.temperature, distill.alpha); prints the run"
    )
    p.add_argument("config", nargs="?", help="CONFIG.yaml with a distill section (distill.teacher: a run or model)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--resume", metavar="RUN", help="continue the distillation run RUN from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill)

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
    c = data_sub.add_parser(
        "check", help="validate a data file: counts, lengths, problems, duplicates, leaks, personal data, labels"
    )
    c.add_argument("file")
    c.add_argument("--eval", metavar="FILE", help="evaluation data: report its records that are also in FILE")
    c.add_argument(
        "--model",
        default=None,
        help="whose tokenizer and chat template to use (default smollm2-135m-instruct); for classification data "
        "also finds label errors on its embeddings instead of TF-IDF",
    )
    c.add_argument("--json", action="store_true", help="the report as JSON (default: a readable table)")
    _add_render_flags(c)
    c.set_defaults(func=cmd_data_check)
    c = data_sub.add_parser("show", help="records rendered with the chat template, loss spans marked")
    c.add_argument("file")
    c.add_argument("--n", type=_at_least(1), default=3, help="records to show")
    c.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and chat template to use")
    c.add_argument("--no-colour", action="store_true", help="brackets instead of colour on a terminal")
    _add_render_flags(c)
    c.set_defaults(func=cmd_data_show)
    c = data_sub.add_parser("clean", help="write a cleaned copy and CLEAN.report.json of every change")
    c.add_argument("file")
    c.add_argument("--out", required=True, metavar="CLEAN", help="the cleaned file (never the input)")
    c.add_argument("--dedup", action="store_true", help="drop exact and near duplicates (and, with --eval, leaks)")
    c.add_argument("--eval", metavar="FILE", help="with --dedup: also drop training records found in FILE")
    c.add_argument("--scrub-pii", action="store_true", help="replace personal data with typed placeholders")
    c.add_argument("--drop-label-errors", action="store_true", help="drop likely label errors (classification)")
    c.add_argument(
        "--balance",
        nargs="?",
        const="undersample",
        choices=["undersample", "oversample"],
        help="equal class counts (classification; default undersample)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true", help="the report as JSON (default: a readable table)")
    c.set_defaults(func=cmd_data_clean)

    p = sub.add_parser("methods", help="list tuning methods with their config blocks and defaults")
    p.add_argument("--model", help="also count trainable/total params and artifact size on this model")
    p.add_argument("--task", default="causal_lm", choices=["causal_lm", "classification"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("runs", help="the registry of runs: list (filters, --json), diff RUN_A RUN_B, rm RUN ...")
    p.add_argument("dir", nargs="?", default="runs", help="the runs directory, or `diff` / `rm`")
    p.add_argument("names", nargs="*", help="diff: two run names; rm: the runs to delete")
    p.add_argument("--dir", dest="runs_dir", default="runs", help="the runs directory for diff / rm")
    p.add_argument("--method")
    p.add_argument("--model", help="runs whose model name contains this")
    p.add_argument("--since", help="runs started on or after this date (YYYY-MM-DD)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(action="list")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("sweep", help="hyperparameter search (Optuna): every trial a run; writes best.yaml")
    p.add_argument("config", help="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="dotted key: [choices] or {low, high, log}")
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials in the study (run again: continues)")
    p.add_argument("--metric", default="eval_loss", help="what a trial is scored on (eval_loss, eval_exact_match, ...)")
    p.add_argument("--direction", choices=["min", "max"], help="default: min for losses and perplexities, else max")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="trials trained at once (worker processes)")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"], help="stops bad trials early")
    p.add_argument("--name", help="the sweep's folder inside out_dir (default: sweep-<config name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar per trial")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "estimate", help="parameters, peak memory, time, energy and cost of a run, without loading weights"
    )
    p.add_argument("config", help="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--json", action="store_true")
    p.add_argument("--probe", action="store_true", help="also train 3 real steps and report measured vs estimated")
    p.add_argument("--all-methods", action="store_true", help="every method side by side")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="also the per-rank peak under DDP and FSDP")
    p.add_argument("--price-per-hour", type=float, help="machine price per hour (cost = price x predicted hours)")
    p.add_argument("--price-per-kwh", type=float, help="energy price per kWh")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("compare", help="train several methods on the same data and budget; HTML/Markdown/JSON report")
    p.add_argument("config", help="CONFIG.yaml")
    p.add_argument("overrides", nargs="*", help="key=value for every method, METHOD:key=value for one")
    p.add_argument("--methods", required=True, help="comma-separated, e.g. lora,dora,adapter,prefix,ia3,full")
    p.add_argument("--out", default="compare", metavar="DIR", help="where the runs and the reports go")
    p.add_argument("--budget-mem", metavar="X", help="recommend only methods whose measured peak fits (e.g. 2GiB)")
    p.add_argument("--budget-time", metavar="Y", help="recommend only methods that train within this (e.g. 10m)")
    p.add_argument("--metric", help="the eval metric to rank on (default: accuracy / exact_match / loss by task)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

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

    p = sub.add_parser("export", help="the trained model as an adapter, a merged model, GGUF/Ollama, int8; parity")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "ollama"])
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base: a plain transformers model")
    p.add_argument("--quantize", choices=["int8", "q8_0", "f16", "nf4"], help="int8/nf4 (hf), q8_0/f16 (gguf)")
    prune = p.add_mutually_exclusive_group()
    prune.add_argument("--prune-layers", type=int, metavar="N", help="remove the N least important decoder blocks")
    prune.add_argument("--prune", type=float, metavar="AMOUNT", help="zero this fraction of each linear weight")
    p.add_argument("--heal-steps", type=int, default=0, metavar="N", help="a short LoRA run on the pruned model")
    p.add_argument("--prompts", metavar="FILE", help="parity conversations (default: the run's validation split)")
    p.add_argument("--max-prompts", type=int, default=16, metavar="N", help="parity uses at most N conversations")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench", help="tunelab's fast path vs a transformers Trainer + peft baseline, measured in the same run; JSON"
    )
    p.add_argument("--quick", action="store_true", help="a few steps (under 3 minutes on 2 CPU cores) instead of 30")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per phase, the first one a warm-up")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile each phase's last step with torch.profiler; tables in bench-profile-PHASE.txt next to --out "
        "(or here); that step is not timed",
    )
    p.add_argument(
        "--compile",
        choices=["auto", "true", "false"],
        default="auto",
        help="the fast phase's train.compile (torch.compile); its compile time is in the warm-up step, reported apart",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run the phases one after the other, not by turns of one step: only one model in memory at a time, "
        "but the machine's drift between the phases then moves the speedup",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: a base and many adapters, batched together")
    _add_serve_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="local web dashboard: runs, live curves, comparison, playground, start a run")
    p.add_argument("--runs", action="append", metavar="DIR", help="a runs directory (repeatable; default: runs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--api-key-file", metavar="F", help="the key the login page asks for (needed off loopback)")
    auth.add_argument("--no-auth", action="store_true", help="no key on a non-loopback address")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("serve-bench", help="loopback load check of tunelab serve (base, 1 adapter, 4 mixed); JSON")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--requests", type=int, default=32, help="requests per scenario")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="each scenario keeps its best of this many rounds")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(func=cmd_serve_bench)
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
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not in a traceback at exit
        return code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunelab data show F | head`: stop quietly, as a command killed by SIGPIPE does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail too
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
