"""Command-line front door: ``ebft validate|train CFG [--key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ebft.errors import EbftError

log = logging.getLogger("ebft")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebft",
        description="Energy-Based Fine-Tuning (feature matching) for Hugging Face causal language models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "load and check a config, print the resolved config; loads no weights"),
        ("train", "train with EBFT as the config says"),
    ):
        cmd = sub.add_parser(
            name,
            help=text,
            description=text + ". Any config key can be overridden: --ebft.stride=4 --max_steps=10.",
        )
        cmd.add_argument("config", help="path to the YAML config")
    return parser


def _setup_logging() -> None:
    from rich.logging import RichHandler

    if not log.handlers:
        handler = RichHandler(show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
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
        return _run(args, _split_overrides(extra))
    except EbftError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args, overrides: list[str]) -> int:
    from ebft.config import config_warnings, dump_config, load_config

    cfg = load_config(args.config, overrides)
    for warning in config_warnings(cfg):
        log.warning(warning)
    if args.command == "validate":
        print(dump_config(cfg), end="")
        return 0
    from ebft.trainer import train

    result = train(cfg)
    log.info("done: %d steps, model saved to %s", result.steps, result.output_dir)
    return 0


def entrypoint() -> None:
    sys.exit(main())
