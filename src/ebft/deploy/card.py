"""The run card: ``README.md`` in Hugging Face model-card format (YAML front matter, then Markdown).

Front matter: ``base_model`` (when it is a Hub id; a local folder is named in the text instead, since
the Hub only links ids), ``library_name`` (peft for an adapter, transformers for a full or merged
model), ``tags``, ``datasets`` (the Hub ids among the training datasets) and ``pipeline_tag``. The body
describes the data, the EBFT settings and the final logged metrics; the whole resolved config sits
beside it in ``config.yaml``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ebft.config import TrainConfig

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
PAPER = "https://arxiv.org/abs/2603.12248"

# Per mode, the settings that define its rollouts and rewards (in the order shown).
_COMMON = ("feature_network", "feature_layers", "feature_norm", "embed_method", "use_whitening")
_REWARD = ("alignment_coef", "diversity_coef", "rl_coef", "ce_coef")
_STRIDED = ("stride", "context_length", "generate_max_len", "n_samples_per_prompt", "temperature", "top_p")
_STRUCTURED_TRL = ("num_generations", "max_completion_length", "temperature", "top_p", "loss_type", "scale_rewards")
_TRAINING = (
    "max_steps",
    "num_epochs",
    "learning_rate",
    "lr_scheduler",
    "optimizer",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "sequence_len",
    "bf16",
    "seed",
)


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not a local path."""
    return bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()


def front_matter(cfg: TrainConfig, kind: str) -> dict:
    tags = ["ebft", "energy-based-fine-tuning", f"ebft-{cfg.ebft.mode}"]
    if cfg.adapter is not None and kind == "adapter":
        tags += [cfg.adapter, "peft"]
    meta: dict = {}
    if is_hub_id(cfg.base_model):
        meta["base_model"] = cfg.base_model
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["tags"] = tags
    datasets = sorted({d.path for d in cfg.datasets if is_hub_id(d.path)})
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "text-generation"
    return meta


@dataclass(frozen=True)
class FinalModel:
    """Which weights a run handed over: those after optimizer ``step`` of the run's ``steps``, chosen as
    ``reason`` says; ``evaluation``: that model's held-out metrics (``eval/`` names) when it was evaluated;
    ``stopped``: why the run ended before its last step (early stopping), or None."""

    step: int
    steps: int
    reason: str = "the last step"
    evaluation: dict = field(default_factory=dict)
    stopped: str | None = None


def render_card(cfg: TrainConfig, *, kind: str, metrics: dict, final: FinalModel | None = None) -> str:
    """The card's text. ``kind``: adapter | full | merged; ``metrics``: the last logged values (with ``step``);
    ``final``: which weights these are (None: not known, e.g. a merge of a run without a record of it)."""
    name = Path(cfg.output_dir).name
    head = "---\n" + yaml.safe_dump(front_matter(cfg, kind), sort_keys=False) + "---\n"
    what = {
        "adapter": "a LoRA adapter (PEFT) for",
        "full": "a full fine-tune of",
        "merged": "a LoRA adapter merged into the weights of",
    }[kind]
    lines = [
        f"# {name}",
        "",
        f"This is {what} `{cfg.base_model}`, trained with Energy-Based Fine-Tuning "
        f"([EBFT]({PAPER}), feature matching) in `{cfg.ebft.mode}` mode by the `ebft` library.",
        "",
        *_model_notes(cfg, kind),
        "## Data",
        "",
        "| dataset | transform | split |",
        "|---|---|---|",
        *(f"| `{d.path}` | `{d.type or '-'}` | `{d.split}` |" for d in cfg.datasets),
        "",
        "## EBFT settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | `{value}` |" for key, value in _settings(cfg)),
        "",
        "The whole resolved config is `config.yaml`.",
        "",
        *_final_model_lines(final),
        "## Final metrics",
        "",
        *_metric_lines(metrics),
        "## Use",
        "",
        "```python",
        *_usage(cfg, kind),
        "```",
        "",
    ]
    return head + "\n".join(lines)


def write_card(directory: Path, cfg: TrainConfig, *, kind: str, metrics: dict, final: FinalModel | None = None) -> Path:
    """Write ``directory/README.md`` (replacing the placeholder card that PEFT saves with an adapter)."""
    path = Path(directory) / "README.md"
    path.write_text(render_card(cfg, kind=kind, metrics=metrics, final=final), encoding="utf-8")
    return path


def _final_model_lines(final: FinalModel | None) -> list[str]:
    if final is None:
        return []
    lines = ["## Final model", "", f"The weights after optimizer step {final.step} of {final.steps}: {final.reason}."]
    if final.stopped is not None:
        lines += ["", final.stopped]
    values = {k: v for k, v in final.evaluation.items() if isinstance(v, (int, float))}
    if values:
        lines += ["", f"Its held-out evaluation (step {final.step}):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in values.items()]
    return [*lines, ""]


def _model_notes(cfg: TrainConfig, kind: str) -> list[str]:
    notes = []
    if not is_hub_id(cfg.base_model):
        notes.append(f"- Base model: the local model `{cfg.base_model}`.")
    if cfg.adapter is not None:
        targets = "all linear layers" if cfg.lora_target_linear else f"`{cfg.lora_target_modules}`"
        notes.append(f"- LoRA: r = {cfg.lora_r}, alpha = {cfg.lora_alpha}, targets {targets}.")
    if cfg.lora_model_dir is not None:
        notes.append(f"- Warm start: training continued the adapter `{cfg.lora_model_dir}`.")
    if cfg.load_in_4bit or cfg.load_in_8bit:
        bits = 4 if cfg.load_in_4bit else 8
        merged = " The merge used the unquantised base weights." if kind == "merged" else ""
        notes.append(f"- Trained over a {bits}-bit (bitsandbytes) quantised base.{merged}")
    return [*notes, ""] if notes else []


def _settings(cfg: TrainConfig) -> list[tuple[str, object]]:
    e = cfg.ebft
    rows = [(f"ebft.{key}", getattr(e, key)) for key in (*_COMMON, *_REWARD)]
    if e.mode == "strided":
        rows += [(f"ebft.{key}", getattr(e, key)) for key in (*_STRIDED, "advantage_estimator")]
    else:
        rows += [(f"trl.{key}", getattr(cfg.trl, key)) for key in _STRUCTURED_TRL]
    return rows + [(key, getattr(cfg, key)) for key in _TRAINING]


def _metric_lines(metrics: dict) -> list[str]:
    values = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
    if not values:
        return ["No metrics were logged.", ""]
    step = metrics.get("step")
    lead = f"Logged at step {step} (means over the last logging window):" if step is not None else "Last logged:"
    return [lead, "", "| metric | value |", "|---|---|", *(f"| {k} | {v:.6g} |" for k, v in sorted(values.items())), ""]


def _usage(cfg: TrainConfig, kind: str) -> list[str]:
    if kind == "adapter":
        return [
            "from peft import AutoPeftModelForCausalLM",
            'model = AutoPeftModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
            "# or a plain model: ebft merge-lora THIS_FOLDER --out merged",
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
    ]
