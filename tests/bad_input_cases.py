"""Every bad input a user can give the CLI, as table rows (id, case builder, exit code, expected message parts);
each case builder writes its files under the case's folder and returns the argv for main.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

# A layout every case shares: a block needs context_length 8 + generate_max_len 8 = 16 tokens.
EBFT = {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 2}


@dataclass
class Env:
    """The folder, tiny model and text file of one case, and builders of its configs and argv."""

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


def jsonl(rows: list[dict]) -> str:
    """Rows as JSON-lines text."""
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
    path.write_text(jsonl(rows), encoding="utf-8")
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
        lambda env: env.with_data("rows.jsonl", jsonl([{"body": "def f(x):\n    return x\n" * 20}] * 3)),
        2,
        ["no rows to train on", "{tmp}/rows.jsonl", "row 0", "no text column", "text, content, question"],
    ),
    (
        "the named field is missing",
        lambda env: env.with_data("rows.jsonl", jsonl([{"text": "x = 1\n" * 40}] * 2), field="code"),
        2,
        ["no rows to train on", "row 0", "no column 'code'"],
    ),
    (
        "every document too short for a block",
        lambda env: env.with_data("short.jsonl", jsonl([{"text": "x = 1"}, {"text": "y"}]), pack=False),
        2,
        ["no rows to train on", "all 2 rows", "{tmp}/short.jsonl", "row 0", "no strided block fits", "needs 16"],
    ),
    (
        "packed documents too short for a block",
        lambda env: env.with_data("short.jsonl", jsonl([{"text": "x = 1"}, {"text": "y"}])),
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


def error_message(stderr: str) -> str:
    """The one ``error:`` message, which ends stderr (progress bars of the data loading may precede it)."""
    lines = stderr.replace("\r", "\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr
    return "\n".join(lines[starts[0] :])
