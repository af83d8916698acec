"""Bad input ends in one clear ``error:`` line naming the key, file or row, exit code 2, no traceback.

The table drives ``ebft.cli.main`` with one broken config, dataset, model folder or command line per
row and checks the exit code and the words the message must contain. The property-based tests feed
random configs to ``ebft validate`` and random rows to the data layer and check that every failure is
an ``EbftError`` (never a raw exception from yaml, pydantic, datasets or a transform).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import stdlib_texts
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ebft.cli import main
from ebft.config import (
    IGNORED_AXOLOTL_KEYS,
    UNSUPPORTED_AXOLOTL_KEYS,
    DatasetSpec,
    EbftSection,
    TrainConfig,
    parse_config,
)
from ebft.data.load import load_strided_datasets
from ebft.errors import ConfigError, EbftError

# A layout every case shares: a block needs context_length 8 + generate_max_len 8 = 16 tokens.
EBFT = {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 2}


@dataclass
class Env:
    tmp: Path
    model: Path  # the tiny Llama with its tokenizer
    text: Path  # a jsonl of a few real documents, each hundreds of tokens long

    def config(self, **changes) -> dict:
        """A small valid strided config; keyword arguments replace top-level keys, ``ebft`` is merged."""
        config = {
            "base_model": str(self.model),
            "rl": "ebft",
            "ebft": {**EBFT, **changes.pop("ebft", {})},
            "datasets": [{"path": str(self.text), "type": "ebft_pretrain.transform"}],
            "sequence_len": 32,
            "micro_batch_size": 1,
            "max_steps": 1,
            "bf16": False,
            "seed": 0,
            "output_dir": str(self.tmp / "out"),
        }
        config.update(changes)
        return config

    def write(self, config: dict | str, name: str = "config.yaml") -> Path:
        path = self.tmp / name
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config), encoding="utf-8")
        return path

    def train(self, config: dict | str, *overrides: str) -> list[str]:
        return ["train", str(self.write(config)), *overrides]

    def with_data(self, name: str, content: str, **dataset) -> list[str]:
        """Train on a dataset file called ``name`` holding ``content``."""
        path = self.tmp / name
        path.write_text(content, encoding="utf-8")
        return self.train(self.config(datasets=[{"path": str(path), "type": "ebft_pretrain.transform", **dataset}]))


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def _model_copy(env: Env, name: str, *, tokenizer: bool = False, **config_changes) -> Path:
    """The tiny model's weights and config.json (with ``config_changes``) in a new folder."""
    folder = env.tmp / name
    folder.mkdir()
    files = ("config.json", "model.safetensors") + (("tokenizer.json", "tokenizer_config.json") if tokenizer else ())
    for file in files:
        shutil.copy(env.model / file, folder / file)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def _structured(env: Env, rows: list[dict] | None = None, *, transform: str = "ebft_opencode.transform", **changes):
    """A structured-mode run on ``rows`` (default: two good question/answer rows)."""
    path = env.tmp / "pairs.jsonl"
    rows = (
        rows
        if rows is not None
        else [{"input": "Add one.", "output": "x + 1"}, {"input": "Square.", "output": "x * x"}]
    )
    path.write_text(_jsonl(rows), encoding="utf-8")
    config = env.config(datasets=[{"path": str(path), "type": transform}], sequence_len=64, micro_batch_size=4)
    config["ebft"] = {"mode": "structured"}
    config["trl"] = {"num_generations": 4, "max_completion_length": 16, **changes.pop("trl", {})}
    config.update(changes)
    return env.train(config)


# ---------------------------------------------------------------------------------------------
# Case builders: each writes its files under env.tmp and returns the argv for main.


def _malformed_yaml(env: Env) -> list[str]:
    # Line 5 is indented one space less than the mapping it continues.
    return env.train("base_model: m\nrl: ebft\ndatasets:\n  - path: a.jsonl\n   type: x\n")


def _custom_transform_without_function(env: Env) -> list[str]:
    module = f"ebft_bad_input_{uuid.uuid4().hex[:12]}"
    (env.tmp / f"{module}.py").write_text("def something_else(cfg, **kwargs):\n    return None\n", encoding="utf-8")
    return env.train(env.config(datasets=[{"path": str(env.text), "type": f"{module}.transform"}]))


def _base_model_without_tokenizer(env: Env) -> list[str]:
    return env.train(env.config(base_model=str(_model_copy(env, "weights-only"))))


def _tokenizer_without_pad_or_eos(env: Env) -> list[str]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = _model_copy(env, "no-pad-no-eos")
    vocab = {"<unk>": 0, **{word: i + 1 for i, word in enumerate(("def", "return", "x", "=", "1"))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    return env.train(env.config(base_model=str(folder)))


def _sequence_len_beyond_positions(env: Env) -> list[str]:
    # Llama has rotary positions and no position table, so a smaller limit loads the same weights.
    folder = _model_copy(env, "short-positions", tokenizer=True, max_position_embeddings=24)
    return env.train(env.config(base_model=str(folder)))


def _truncated_weights(env: Env) -> list[str]:
    folder = _model_copy(env, "truncated", tokenizer=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # as an interrupted download leaves it
    return env.train(env.config(base_model=str(folder)))


def _weights_not_matching_config(env: Env) -> list[str]:
    folder = _model_copy(env, "mismatch", tokenizer=True, intermediate_size=100)  # the weights have 4 * 64
    return env.train(env.config(base_model=str(folder)))


def _output_dir_holds_a_run(env: Env) -> list[str]:
    (env.tmp / "out").mkdir()
    (env.tmp / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return env.train(env.config())


def _empty_folder(env: Env) -> list[str]:
    folder = env.tmp / "data"
    folder.mkdir()
    (folder / "README.md").write_text("no data here\n")
    return env.train(env.config(datasets=[{"path": str(folder), "type": "ebft_pretrain.transform"}]))


Builder = Callable[[Env], list[str]]
# (case, builder, expected exit code, substrings the stderr message must contain). "{tmp}" in a
# substring is replaced by the case's folder, so that messages are checked to name the file.
CASES: list[tuple[str, Builder, int, list[str]]] = [
    ("malformed yaml", _malformed_yaml, 2, ["config.yaml", "malformed YAML at line 5"]),
    (
        "top level is a list",
        lambda env: env.train("- base_model: m\n- rl: ebft\n"),
        2,
        ["config.yaml", "the top level must be a mapping", "got a list"],
    ),
    (
        "empty config file",
        lambda env: env.train(""),
        2,
        ["config.yaml", "the top level must be a mapping", "got an empty file"],
    ),
    (
        "wrong type",
        lambda env: env.train(env.config(micro_batch_size="two")),
        2,
        ["micro_batch_size: must be a whole number (got 'two')"],
    ),
    (
        "datasets is a number",
        lambda env: env.train(env.config(datasets=1)),
        2,
        ["datasets: must be a list (got 1)"],
    ),
    (
        "unknown key at the root",
        lambda env: env.train(env.config(learning_rat=0.1)),
        2,
        ["learning_rat: unknown key, did you mean 'learning_rate'?"],
    ),
    (
        "unknown key in ebft",
        lambda env: env.train(env.config(ebft={"strid": 4})),
        2,
        ["ebft.strid: unknown key, did you mean 'stride'?"],
    ),
    (
        "unknown key in a dataset",
        lambda env: env.train(
            env.config(datasets=[{"path": str(env.text), "type": "ebft_pretrain.transform", "feild": "text"}])
        ),
        2,
        ["datasets.0.feild: unknown key, did you mean 'field'?"],
    ),
    ("stride 0", lambda env: env.train(env.config(ebft={"stride": 0})), 2, ["ebft.stride: must be >= 1 (got 0)"]),
    ("top_p above 1", lambda env: env.train(env.config(ebft={"top_p": 1.5})), 2, ["ebft.top_p: must be <= 1"]),
    (
        "several problems at once",
        lambda env: env.train(env.config(ebft={"stride": 0}, seed=-1)),
        2,
        ["2 problems", "ebft.stride: must be >= 1", "seed: must be >= 0"],
    ),
    (
        "warmup_steps and warmup_ratio",
        lambda env: env.train(env.config(warmup_steps=5, warmup_ratio=0.1)),
        2,
        ["warmup_steps: set warmup_steps or warmup_ratio, not both"],
    ),
    (
        "sequence_len below one block",
        lambda env: env.train(env.config(sequence_len=12)),
        2,
        ["sequence_len: no strided block fits", "8 + 8 = 16", "(got 12)"],
    ),
    (
        "lora without targets",
        lambda env: env.train(env.config(adapter="lora")),
        2,
        ["adapter: set lora_target_linear: true or lora_target_modules"],
    ),
    ("fp16", lambda env: env.train(env.config(fp16=True)), 2, ["fp16: fp16 training is not supported", "bf16"]),
    (
        "missing config file",
        lambda env: ["train", str(env.tmp / "nowhere.yaml")],
        2,
        ["{tmp}/nowhere.yaml", "config file not found"],
    ),
    (
        "missing dataset file",
        lambda env: env.train(
            env.config(datasets=[{"path": str(env.tmp / "gone.jsonl"), "type": "ebft_pretrain.transform"}])
        ),
        2,
        ["{tmp}/gone.jsonl", "no such file or folder"],
    ),
    ("dataset folder without data files", _empty_folder, 2, ["{tmp}/data", "the folder has no"]),
    (
        "unsupported dataset file type",
        lambda env: env.with_data("data.xml", "<doc>text</doc>\n"),
        2,
        ["{tmp}/data.xml", "unsupported file type '.xml'"],
    ),
    (
        "unknown transform module",
        lambda env: env.train(env.config(datasets=[{"path": str(env.text), "type": "no_such_ebft_module.transform"}])),
        2,
        ["no_such_ebft_module.transform", "cannot import module 'no_such_ebft_module'"],
    ),
    (
        "unknown built-in transform function",
        lambda env: env.train(env.config(datasets=[{"path": str(env.text), "type": "ebft_pretrain.transfrom"}])),
        2,
        ["ebft_pretrain.transfrom", "has no function 'transfrom'"],
    ),
    (
        "custom transform module without the function",
        _custom_transform_without_function,
        2,
        ["ebft_bad_input_", "has no function 'transform'"],
    ),
    (
        "every row lacks the text field",
        lambda env: env.with_data("rows.jsonl", _jsonl([{"body": "def f(x):\n    return x\n" * 20}] * 3)),
        2,
        ["no rows to train on", "{tmp}/rows.jsonl", "row 0", "no text column", "text, content, question"],
    ),
    (
        "the named field is missing",
        lambda env: env.with_data("rows.jsonl", _jsonl([{"text": "x = 1\n" * 40}] * 2), field="code"),
        2,
        ["no rows to train on", "row 0", "no column 'code'"],
    ),
    (
        "every document too short for a block",
        lambda env: env.with_data("short.jsonl", _jsonl([{"text": "x = 1"}, {"text": "y"}]), pack=False),
        2,
        ["no rows to train on", "all 2 rows", "{tmp}/short.jsonl", "row 0", "no strided block fits", "needs 16"],
    ),
    (
        "packed documents too short for a block",
        lambda env: env.with_data("short.jsonl", _jsonl([{"text": "x = 1"}, {"text": "y"}])),
        2,
        ["no rows to train on", "packed chunk 0", "no strided block fits"],
    ),
    (
        "a line of a jsonl is not JSON",
        lambda env: env.with_data("broken.jsonl", '{"text": "x = 1"}\n{"text": \n'),
        2,
        ["{tmp}/broken.jsonl", "JSON parse error", "in row 1"],
    ),
    ("empty jsonl", lambda env: env.with_data("empty.jsonl", ""), 2, ["{tmp}/empty.jsonl", "empty file"]),
    (
        "base_model folder does not exist",
        lambda env: env.train(env.config(base_model=str(env.tmp / "no-model"))),
        2,
        ["base_model: no such folder '{tmp}/no-model'"],
    ),
    (
        "base_model is a file",
        lambda env: env.train(env.config(base_model=str(env.model / "config.json"))),
        2,
        ["base_model: '", "config.json' is a file, not a model folder"],
    ),
    (
        "tokenizer_config folder does not exist",
        lambda env: env.train(env.config(tokenizer_config=str(env.tmp / "no-tokenizer"))),
        2,
        ["tokenizer_config: no such folder '{tmp}/no-tokenizer'"],
    ),
    (
        "base_model folder without a tokenizer",
        _base_model_without_tokenizer,
        2,
        ["base_model: the folder '{tmp}/weights-only' holds no tokenizer", "set tokenizer_config"],
    ),
    (
        "tokenizer without pad or eos token",
        _tokenizer_without_pad_or_eos,
        2,
        ["{tmp}/no-pad-no-eos", "neither a pad token nor an eos token", "special_tokens"],
    ),
    (
        "sequence_len beyond the model's positions",
        _sequence_len_beyond_positions,
        2,
        ["sequence_len: 32 exceeds the model's max_position_embeddings (24)"],
    ),
    (
        "strided mode on an architecture it cannot compute exactly",
        lambda env: env.train(env.config(base_model=str(_model_copy(env, "chunked", attention_chunk_size=8)))),
        2,
        ["base_model: ebft.mode strided cannot compute this 'llama' model exactly", "attention_chunk_size: 8"],
    ),
    (
        "truncated weights file",
        _truncated_weights,
        2,
        ["base_model: cannot load '{tmp}/truncated'", "SafetensorError"],
    ),
    (
        "weights do not match config.json",
        _weights_not_matching_config,
        2,
        ["base_model: cannot load '{tmp}/mismatch'", "RuntimeError"],
    ),
    (
        "output_dir holds another run",
        _output_dir_holds_a_run,
        2,
        ["output_dir: {tmp}/out already holds a run", "metrics.jsonl", "resume_from_checkpoint"],
    ),
    (
        "override without a value",
        lambda env: env.train(env.config(), "--ebft.stride"),
        2,
        ["--ebft.stride", "--key.path=value"],
    ),
    (
        "override of an unknown key",
        lambda env: env.train(env.config(), "--ebft.strid=4"),
        2,
        ["with overrides --ebft.strid=4", "ebft.strid: unknown key, did you mean 'stride'?"],
    ),
    (
        "override of a missing list item",
        lambda env: env.train(env.config(), "--datasets.3.path=x.jsonl"),
        2,
        ["datasets.3: no such list item", "the list has 1 item"],
    ),
    (
        "structured: micro-batch not a multiple of num_generations",
        lambda env: _structured(env, micro_batch_size=3),
        2,
        ["micro_batch_size * gradient_accumulation_steps = 3 * 1 must be a multiple of trl.num_generations = 4"],
    ),
    (
        "structured: vLLM LoRA sync without a LoRA adapter",
        lambda env: _structured(env, trl={"use_vllm": True, "vllm_lora_sync": True}),
        2,
        ["trl.vllm_lora_sync: needs adapter: lora"],
    ),
    (
        "structured: unknown trl key",
        lambda env: _structured(env, trl={"num_generation": 4}),
        2,
        ["trl.num_generation: unknown key, did you mean 'num_generations'?"],
    ),
    (
        "structured: a KL penalty",
        lambda env: _structured(env, trl={"beta": 0.04}),
        2,
        ["trl.beta: EBFT has no reference-model KL penalty"],
    ),
    (
        "structured: rows without the transform's fields",
        lambda env: _structured(env, [{"question": "q", "answer": "a"}] * 2),
        2,
        ["no rows to train on", "pairs.jsonl", "row 0", "input"],
    ),
    (
        "structured: prompt longer than sequence_len leaves room for",
        lambda env: _structured(env, [{"input": "word " * 200, "output": "x"}]),
        2,
        ["no rows to train on", "prompt is", "max_completion_length"],
    ),
    (
        "structured: strided transform in structured mode",
        lambda env: _structured(env, transform="ebft_pretrain.transform"),
        2,
        ["datasets.0.type", "strided-mode rows", "ebft.mode is 'structured'"],
    ),
    (
        "override that looks like an abbreviated --help",
        lambda env: env.train(env.config(), "--he=1"),
        2,
        ["he: unknown key"],
    ),
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    docs = [text[:3000] for text in stdlib_texts(12) if len(text) >= 3000][:4]
    path = tmp_path_factory.mktemp("bad-input-data") / "text.jsonl"
    path.write_text(_jsonl([{"text": doc} for doc in docs]), encoding="utf-8")
    return path


@pytest.mark.parametrize(("builder", "code", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(tmp_path, tiny_model_dir, text_file, capsys, builder, code, expected):
    argv = builder(Env(tmp_path, tiny_model_dir, text_file))
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    message = _error_message(captured.err)
    for part in expected:
        assert part.replace("{tmp}", str(tmp_path)) in message, (part, message)


def _error_message(stderr: str) -> str:
    """The one ``error:`` message, which ends stderr (progress bars of the data loading may precede it)."""
    lines = stderr.replace("\r", "\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr
    return "\n".join(lines[starts[0] :])


@pytest.mark.parametrize("where", ["before the command", "after the config"])
def test_debug_shows_the_traceback(tmp_path, tiny_model_dir, text_file, where):
    env = Env(tmp_path, tiny_model_dir, text_file)
    path = env.write(env.config(ebft={"stride": 0}))
    argv = ["--debug", "validate", str(path)] if where == "before the command" else ["validate", str(path), "--debug"]
    with pytest.raises(ConfigError, match="ebft.stride: must be >= 1"):
        main(argv)


def test_the_process_prints_a_traceback_only_with_debug(tmp_path, tiny_model_dir, text_file):
    env = Env(tmp_path, tiny_model_dir, text_file)
    path = env.write(env.config(ebft={"stride": 0}))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ebft", *args], capture_output=True, text=True, timeout=120)

    plain = run("validate", str(path))
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr
    assert "ebft.stride: must be >= 1" in _error_message(plain.stderr)
    debug = run("--debug", "validate", str(path))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ebft.errors.ConfigError" in debug.stderr and "ebft.stride: must be >= 1" in debug.stderr


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_partly_bad_dataset_skips_rows_with_a_warning_and_trains(tmp_path, tiny_model_dir, text_file):
    env = Env(tmp_path, tiny_model_dir, text_file)
    good = [json.loads(line) for line in text_file.read_text().splitlines()][:2]
    rows = [good[0], {"body": "no text here"}, {"text": ""}, good[1]]
    data = tmp_path / "mixed.jsonl"
    data.write_text(_jsonl(rows), encoding="utf-8")
    config = env.config(datasets=[{"path": str(data), "type": "ebft_pretrain.transform", "pack": False}])
    collect = _Collect()
    logging.getLogger("ebft").addHandler(collect)
    try:
        assert main(env.train(config)) == 0
    finally:
        logging.getLogger("ebft").removeHandler(collect)
    (skipped,) = [m for m in collect.messages if m.startswith("Skipped")]
    # Row 1 has no text column (null after the json loader unifies the columns); row 2 is only the
    # EOS token that pack: false appends, 1 token where a block needs 16.
    assert skipped.startswith(f"Skipped 2 unusable rows of '{data}'")
    assert f"first: dataset '{data}', row 1: transform raised TypeError: column 'text' holds NoneType" in skipped
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]


# ---------------------------------------------------------------------------------------------
# Property-based: random configs through `ebft validate`


def _keys_of(model) -> list[str]:
    return list(model.model_fields)


ROOT_KEYS = [*_keys_of(TrainConfig), *IGNORED_AXOLOTL_KEYS, *UNSUPPORTED_AXOLOTL_KEYS]
EBFT_KEYS = _keys_of(EbftSection)
DATASET_KEYS = [*_keys_of(DatasetSpec), "train_on_split"]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 8, 2**31, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, 1e-12, 1e308]),
    st.text(max_size=12),
    st.sampled_from(["", "auto", "strided", "structured", "lora", "ebft", "rloo", "cpu", "a.b", "train[:50%]"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_odd_keys = st.one_of(st.text(max_size=10), st.integers(-3, 3), st.booleans(), st.none())


_SECTIONS = ["ebft", "datasets", "datasets.0", "special_tokens", "trl", "gradient_checkpointing_kwargs"]


@st.composite
def _random_configs(draw) -> object:
    """A mostly valid config with random values on known keys, random unknown keys and odd shapes."""
    if draw(st.integers(0, 19)) == 0:
        return draw(_values)  # sometimes not a mapping at all
    config: dict = {
        "base_model": "org/model",
        "rl": "ebft",
        "ebft": dict(EBFT),
        "datasets": [{"path": "data.jsonl", "type": "ebft_pretrain.transform"}],
        "sequence_len": 32,
    }
    for section, keys in ((config, ROOT_KEYS), (config["ebft"], EBFT_KEYS), (config["datasets"][0], DATASET_KEYS)):
        for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
            section[key] = draw(_values)
        section.update(draw(st.dictionaries(_odd_keys, _values, max_size=2)))
    # A whole section of the wrong shape: a scalar, a list or a mapping where another is expected.
    name = draw(st.sampled_from([None, *_SECTIONS]))
    if name is not None:
        value = draw(_scalars | _values)
        if name == "datasets.0":
            config["datasets"] = [value]
        else:
            config[name] = value
    return config


_override_keys = st.one_of(
    st.sampled_from([*ROOT_KEYS, *(f"ebft.{k}" for k in EBFT_KEYS), *(f"datasets.0.{k}" for k in DATASET_KEYS)]),
    st.from_regex(r"[a-z_]{1,6}(\.[a-z0-9_]{1,4}){0,2}", fullmatch=True),
)
_overrides = st.lists(st.builds(lambda key, value: f"--{key}={value}", _override_keys, st.text(max_size=8)), max_size=2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=_random_configs(), overrides=_overrides)
@example(config={"base_model": "m", "rl": "ebft", "ebft": {"mode": "strided"}, "datasets": 1}, overrides=[])
def test_random_configs_validate_or_fail_cleanly(config, overrides, capsys):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        code = main(["validate", str(path), *overrides])
    captured = capsys.readouterr()
    event(f"exit {code}")
    assert code in (0, 2), captured.err
    if code == 2:
        assert "Traceback" not in captured.err
        assert _error_message(captured.err).strip() != "error:"
    else:
        assert yaml.safe_load(captured.out)["rl"] == "ebft"


# ---------------------------------------------------------------------------------------------
# Property-based: random rows through the data layer

ROW_FIELDS = [
    "text",
    "content",
    "question",
    "input",
    "output",
    "prompt",
    "completion",
    "answer",
    "messages",
    "conversations",
    "input_ids",
    "labels",
    "prompt_length",
]
CODE = ["def f(x):\n    return x + 1\n" * 4, "import os\nprint(os.getcwd())\n" * 3, "x = [i * i for i in range(10)]\n"]
# Real code (long enough for a block) as often as random or degenerate text.
_texts = st.sampled_from(CODE) | st.text(max_size=80) | st.sampled_from(["", " ", "<|user|><|assistant|>"])
_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": _texts})
    | st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "x"]), "value": _texts})
    | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    max_size=4,
)
# Mostly token ids of the tiny vocabulary (384), sometimes negative or far beyond it.
_ids = st.lists(st.integers(0, 383) | st.integers(-200, 2**40), min_size=0, max_size=40)
_usable_ids = st.integers(12, 24).flatmap(lambda n: st.lists(st.integers(7, 383), min_size=n, max_size=n))
_user_turn = st.fixed_dictionaries({"role": st.just("user"), "content": _texts})
_assistant_turn = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.sampled_from(CODE)})
_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.integers(-200, 500),
    st.floats(allow_nan=False, allow_infinity=False),
    _texts,
)
_row_values = st.one_of(_json_scalars, _ids, _messages, st.lists(_json_scalars, max_size=4))
# Row shapes the transforms expect, keyed by the transform (None: already tokenized rows).
_PLAUSIBLE = {
    "ebft_pretrain.transform": st.fixed_dictionaries({"text": _texts}),
    "ebft_strided_structured.transform": st.fixed_dictionaries({"input": _texts, "output": _texts}),
    "ebft_strided_chat.transform": st.fixed_dictionaries(
        {"messages": _messages | st.tuples(_user_turn, _assistant_turn).map(list)}
    ),
    None: st.fixed_dictionaries(
        {"input_ids": _ids | _usable_ids, "labels": _ids | _usable_ids}, optional={"prompt_length": st.integers(-2, 50)}
    ),
}


@st.composite
def _row(draw, kind) -> dict:
    """A row of the expected shape, sometimes damaged: a field dropped, replaced or added."""
    row = dict(draw(_PLAUSIBLE[kind]))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(
            st.sampled_from(sorted(row) or ROW_FIELDS) | st.sampled_from(ROW_FIELDS) | st.text(min_size=1, max_size=6)
        )
        if draw(st.booleans()):
            row.pop(key, None)
        else:
            row[key] = draw(_row_values)
    return row


@st.composite
def _dataset_cases(draw) -> tuple[dict, list[dict]]:
    """(dataset entry options, rows); the rows usually, but not always, suit the entry's transform."""
    transform = draw(st.sampled_from(list(_PLAUSIBLE)))
    kind = draw(st.sampled_from([transform, transform, transform, *_PLAUSIBLE]))
    entry = {"type": transform} if transform else {}
    if transform == "ebft_pretrain.transform":
        entry.update(
            draw(st.fixed_dictionaries({}, optional={"pack": st.booleans(), "field": st.sampled_from(ROW_FIELDS)}))
        )
    return entry, draw(st.lists(_row(kind), min_size=1, max_size=6))


def _kept_rows_or_clean_error(load, cfg, tokenizer) -> list:
    """The rows ``load(cfg, tokenizer)`` kept (train and validation; never none), or [] after checking
    that its failure was a clean EbftError with a message."""
    try:
        data = load(cfg, tokenizer)
    except EbftError as exc:
        assert str(exc).strip()
        event("clean error: " + re.sub(r"'[^']*'", "'...'", str(exc))[:40])
        return []
    event("loaded, some rows skipped" if data.skipped else "loaded")
    kept = list(data.train) + (list(data.val) if data.val is not None else [])
    assert kept
    return kept


@pytest.fixture(scope="module")
def rows_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("random-rows")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=_dataset_cases(),
    layout=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(0, 3)),
    val_set_size=st.sampled_from([0.0, 0.5, 1, 3]),
)
# Rows of empty objects: datasets finds no data at all (its ValueError must become a DataError).
@example(case=({"type": "ebft_pretrain.transform"}, [{}, {}]), layout=(1, 1, 1, 0), val_set_size=0.0)
# One usable row and one without a completion: loads, with one row skipped.
@example(
    case=({"type": "ebft_strided_structured.transform"}, [{"input": "q", "output": CODE[0]}, {"input": "q"}]),
    layout=(2, 2, 2, 1),
    val_set_size=0.0,
)
def test_random_rows_load_or_fail_cleanly(case, layout, val_set_size, tiny_tokenizer, rows_folder):
    entry, rows = case
    stride, context_length, generate_max_len, min_prefix = layout
    path = rows_folder / f"{uuid.uuid4().hex}.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    ebft = {
        **EBFT,
        "stride": stride,
        "context_length": context_length,
        "generate_max_len": generate_max_len,
        "min_completion_prefix": min_prefix,
    }
    cfg = parse_config(
        {
            "base_model": "m",
            "rl": "ebft",
            "ebft": ebft,
            "datasets": [{"path": str(path), **entry}],
            "sequence_len": 24,
            "val_set_size": val_set_size,
        }
    )
    kept = _kept_rows_or_clean_error(load_strided_datasets, cfg, tiny_tokenizer)
    # Whatever was kept is usable: token ids in the vocabulary, matching labels, within sequence_len.
    for row in kept:
        assert 0 < len(row["input_ids"]) <= cfg.sequence_len
        assert len(row["labels"]) == len(row["input_ids"])
        assert all(0 <= t < len(tiny_tokenizer) for t in row["input_ids"])


# Row shapes the structured transforms expect (None: rows that already hold prompt and ground_truth).
_STRUCTURED_PLAUSIBLE = {
    "ebft_opencode.transform": st.fixed_dictionaries({"input": _texts, "output": _texts}),
    "ebft_chat_multiturn.transform": st.fixed_dictionaries(
        {"messages": _messages | st.tuples(_user_turn, _assistant_turn, _user_turn, _assistant_turn).map(list)}
    ),
    "ebft_chat_multiturn.transform_all_turns": st.fixed_dictionaries(
        {"messages": _messages | st.tuples(_user_turn, _assistant_turn).map(list)}
    ),
    "ebft_reasoning.transform_split_thinking": st.fixed_dictionaries(
        {"messages": st.tuples(_user_turn, _assistant_turn).map(list) | _messages}
    ),
    None: st.fixed_dictionaries(
        {"prompt": _texts | _messages, "ground_truth": _texts},
        optional={"remaining_turns": _messages, "tests": _row_values},
    ),
}


@st.composite
def _structured_cases(draw) -> tuple[dict, list[dict]]:
    transform = draw(st.sampled_from(list(_STRUCTURED_PLAUSIBLE)))
    rows = []
    for _ in range(draw(st.integers(1, 5))):
        row = dict(draw(_STRUCTURED_PLAUSIBLE[transform]))
        if draw(st.booleans()):  # damage: a field dropped or replaced
            key = draw(st.sampled_from(sorted(row) or ROW_FIELDS))
            if draw(st.booleans()):
                row.pop(key, None)
            else:
                row[key] = draw(_row_values)
        rows.append(row)
    return ({"type": transform} if transform else {}), rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_structured_cases(), val_set_size=st.sampled_from([0.0, 0.5, 1]))
def test_random_structured_rows_load_or_fail_cleanly(case, val_set_size, tiny_tokenizer, rows_folder):
    """Structured-mode loading: any row either becomes a usable prompt row or is a clean error/skip."""
    from ebft.data.structured import load_structured_datasets

    entry, rows = case
    path = rows_folder / f"{uuid.uuid4().hex}.jsonl"
    path.write_text(_jsonl(rows), encoding="utf-8")
    cfg = parse_config(
        {
            "base_model": "m",
            "rl": "ebft",
            "ebft": {"mode": "structured"},
            "trl": {"num_generations": 2, "max_completion_length": 8},
            "micro_batch_size": 2,
            "datasets": [{"path": str(path), **entry}],
            "sequence_len": 48,
            "val_set_size": val_set_size,
        }
    )
    kept = _kept_rows_or_clean_error(load_structured_datasets, cfg, tiny_tokenizer)
    for row in kept:
        # Room for a whole completion after the prompt, and a ground truth that fits with it.
        assert 0 < len(row.prompt_ids) <= cfg.sequence_len - cfg.trl.max_completion_length
        assert len(row.prompt_ids) + len(row.gt_ids) <= cfg.sequence_len
        assert isinstance(row.ground_truth, str) and row.ground_truth
        assert all(0 <= t < len(tiny_tokenizer) for t in (*row.prompt_ids, *row.gt_ids))
