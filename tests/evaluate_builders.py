"""Shared builders of the structured evaluation tests: code rows, a structured config for them, and running
``ebft evaluate`` on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ebft.cli import main
from ebft.config import load_config
from ebft.data.structured import load_structured_datasets
from ebft.modeling.tokenizer import load_tokenizer

G = 3  # completions per prompt
CAP = 8  # trl.max_completion_length; the adaptive cap never exceeds it


def _code_rows() -> list[dict]:
    """OpenCodeInstruct-style rows: 3 whose ground truth passes its tests, 1 whose tests are wrong, and 2 without
    tests. Ground truths of different lengths, so a row can be recognised by its token count."""

    def fenced(body: str) -> str:
        return f"```python\n{body}\n```"

    return [
        {
            "input": "Write add(a, b) that returns the sum.",
            "output": fenced("def add(a, b):\n    # the sum of a and b\n    return a + b"),
            "unit_tests": "['assert add(1, 2) == 3', 'assert add(-1, 1) == 0']",
        },
        {"input": "Say hello.", "output": "hello", "unit_tests": ""},
        {
            "input": "Write neg(x).",
            "output": "def neg(x):\n    return -x",
            "unit_tests": "assert neg(2) == -2",
        },
        {
            "input": "Write double(x) that doubles a number.",
            "output": fenced("def double(x):\n    return 2 * x\n\n\nprint(double(4))"),
            "unit_tests": "['assert double(3) == 6']",
        },
        {"input": "Name a colour.", "output": "deep blue", "unit_tests": ""},
        {
            "input": "Write sub(a, b).",
            "output": fenced("def sub(a, b):\n    return a + b"),
            "unit_tests": "['assert sub(3, 1) == 2']",  # the ground truth is wrong: its tests fail
        },
    ]


def write_config(tmp_path: Path, model_dir: Path, *, ebft=None, trl=None, **top) -> Path:
    """Write the code rows and a small structured config for them under tmp_path; returns the config's path."""
    data = tmp_path / "code.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in _code_rows()))
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured", "use_whitening": False, **(ebft or {})},
        "trl": {"num_generations": G, "max_completion_length": CAP, "temperature": 1.0, **(trl or {})},
        "datasets": [{"path": str(data), "type": "ebft_opencode.transform"}],
        "sequence_len": 96,
        "micro_batch_size": 2 * G,  # two prompts per scoring batch
        "bf16": False,
        "seed": 3,
        "output_dir": str(tmp_path / "out"),
        **top,
    }
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_evaluate(config: Path, tmp_path: Path, *extra: str) -> dict:
    """Run ebft evaluate on config through the CLI and return its JSON report."""
    output = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.json')))}.json"
    assert main(["evaluate", str(config), "--output", str(output), *extra]) == 0
    return json.loads(output.read_text())


def evaluation_data(config: Path, **update):
    """The config's prompt rows as the training loader gives them (with ``update`` applied to the config)."""
    cfg = load_config(config).model_copy(update=update)
    return load_structured_datasets(cfg, load_tokenizer(cfg))
