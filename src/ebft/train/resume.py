"""What a resumed run changed: its resolved config against the one saved in the checkpoint.

Every config key is classified here (a test checks that none is left out). *Breaking* keys change what
the run computes from the checkpoint on: the model and adapter, the data and its batching, sampling, the
EBFT and policy-loss settings, the optimizer and schedule, precision, the seed. A resume that changes
one is refused unless the user says ``--allow_config_change``, since it would not continue the same run.
*Harmless* keys change where results go, how often they are logged or saved, how long the run is
(``max_steps``, ``num_epochs``: an extended run), and where things run; they are listed in one line.

``Launch`` is how the run was started (config path, command-line overrides), for the resume command
printed when a run stops early.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from ebft.errors import ConfigError

log = logging.getLogger("ebft")

BREAKING = frozenset(
    {
        # the model, its tokenizer, and anything that changes its weights or their precision
        "base_model",
        "tokenizer_config",
        "trust_remote_code",
        "special_tokens",
        "rl",
        "adapter",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_target_linear",
        "lora_model_dir",
        "load_in_8bit",
        "load_in_4bit",
        "bf16",
        "torch_dtype",
        "chat_template",  # how prompts and answers are rendered into tokens
        "chat_template_jinja",
        "fsdp_version",  # a sharded checkpoint holds the optimizer state by name, resumable only sharded
        # the data and how it is batched
        "datasets",
        "val_set_size",
        "sequence_len",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "seed",
        # optimizer and schedule
        "learning_rate",
        "optimizer",
        "lr_scheduler",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        # EBFT: features, rewards, rollouts
        "ebft.mode",
        "ebft.feature_layers",
        "ebft.embed_method",
        "ebft.feature_norm",
        "ebft.use_whitening",
        "ebft.whitening_space",
        "ebft.alignment_coef",
        "ebft.diversity_coef",
        "ebft.ce_coef",
        "ebft.rl_coef",
        "ebft.adaptive_max_tokens",
        "ebft.gt_length_multiplier",
        "ebft.stride",
        "ebft.context_length",
        "ebft.generate_max_len",
        "ebft.n_samples_per_prompt",
        "ebft.temperature",
        "ebft.top_p",
        "ebft.advantage_estimator",
        "ebft.min_completion_prefix",
        "ebft.feature_network",
        # structured mode: sampling, where the rollouts come from, and the policy loss
        "trl.num_generations",
        "trl.max_completion_length",
        "trl.temperature",
        "trl.top_p",
        "trl.top_k",
        "trl.min_p",
        "trl.repetition_penalty",
        "trl.use_vllm",
        "trl.vllm_mode",
        "trl.vllm_sync_interval",
        "trl.vllm_importance_sampling_correction",
        "trl.vllm_importance_sampling_cap",
        "trl.vllm_importance_sampling_clip_max",
        "trl.vllm_importance_sampling_clip_min",
        "trl.use_data_producer",
        "trl.async_prefetch",
        "trl.streaming_partial_batch",
        "trl.skip_zero_advantage_batches",
        "trl.scale_rewards",
        "trl.loss_type",
        "trl.epsilon",
        "trl.epsilon_high",
        "trl.num_iterations",
        "trl.mask_truncated_completions",
        "trl.generation_kwargs",
        "trl.chat_template_kwargs",
        "vllm.max_model_len",
        "vllm.dtype",
        # what early stopping and the best model compare: the record of the best so far holds values of this
        # metric on these rows, and would be compared with values of another
        "test_datasets",
        "eval_max_docs",
        "metric_for_best_model",
        "greater_is_better",
    }
)

HARMLESS = frozenset(
    {
        # length of the run
        "max_steps",
        "num_epochs",
        # when held-out metrics are taken and what is done with them (evaluation leaves training untouched)
        "eval_steps",
        "evals_per_epoch",
        "eval_strategy",
        "eval_on_start",
        "eval_batch_size",
        "early_stopping_patience",
        "load_best_model_at_end",
        # where results go, logging, saving, reporting, fault policy
        "output_dir",
        "logging_steps",
        "save_steps",
        "save_final_checkpoint",
        "save_total_limit",
        "resume_from_checkpoint",
        "max_consecutive_skipped_steps",
        "use_tensorboard",
        "wandb_project",
        "wandb_entity",
        "wandb_name",
        "hub_model_id",
        "hub_strategy",
        "hub_private_repo",
        "hub_revision",
        "push_to_hub",
        "merge_lora",
        "ebft.log_rollouts",
        "trl.log_completions",
        "trl.num_completions_to_print",
        # where and how things run, not what they compute
        "dataset_prepared_path",
        "attn_implementation",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "fsdp_config",
        "ebft.feature_device",
        "trl.vllm_server_host",
        "trl.vllm_server_port",
        "trl.vllm_server_timeout",
        "trl.vllm_lora_sync",
        "vllm.host",
        "vllm.port",
        "vllm.gpu_memory_utilization",
        "vllm.tensor_parallel_size",
        "vllm.enforce_eager",
        "vllm.data_parallel_size",
        "vllm.enable_prefix_caching",
        "vllm.weight_transfer_backend",
        "vllm.weight_transfer_chunk_bytes",
        "vllm.weight_transfer_timeout",
    }
)

_SHOWN = 100  # characters of a value shown in a message: its start and its end (a path's name) when longer


@dataclass(frozen=True)
class Launch:
    """How the run was started: the config file and the command-line overrides (``--key=value``)."""

    config: str = "<config>"
    overrides: tuple[str, ...] = ()
    allow_config_change: bool = False

    def resume_command(self, output_dir: Path) -> str:
        """The command that continues this run from its latest checkpoint, its overrides included."""
        replaced = ("--output_dir", "--resume_from_checkpoint")
        kept = [o for o in self.overrides if o.split("=", 1)[0] not in replaced]
        return shlex.join(
            ["ebft", "train", self.config, *kept, f"--output_dir={output_dir}", "--resume_from_checkpoint=latest"]
        )


def classify(path: str) -> bool | None:
    """True (breaking), False (harmless), or None (not classified) for a dotted key path, by the path or its
    nearest classified parent."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in BREAKING:
            return True
        if key in HARMLESS:
            return False
    return None


def _leaves(config: dict, prefix: str = "") -> dict:
    """Dotted path -> value, descending into sections until a classified key (whose value is compared whole)."""
    out = {}
    for key, value in config.items():
        path = prefix + key
        if isinstance(value, dict) and path not in BREAKING and path not in HARMLESS:
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    half = (_SHOWN - 3) // 2
    return text if len(text) <= _SHOWN else text[:half] + "..." + text[-half:]


def changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(breaking, harmless) differences between two resolved configs, each ``key: old -> new``; a key that is
    not classified (from another version of ebft) counts as breaking."""
    old, new = _leaves(saved), _leaves(current)
    missing = object()
    breaking: list[str] = []
    harmless: list[str] = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path, missing), new.get(path, missing)
        if a == b:
            continue
        line = f"{path}: {'(unset)' if a is missing else _shown(a)} -> {'(unset)' if b is missing else _shown(b)}"
        (harmless if classify(path) is False else breaking).append(line)
    return breaking, harmless


def check_resume(checkpoint: Path, saved: dict, current: dict, *, allow_config_change: bool) -> None:
    """Refuse a resume that changes breaking settings (unless allowed: then warn); list harmless ones."""
    breaking, harmless = changes(saved, current)
    if breaking and not allow_config_change:
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} was trained with other settings: {'; '.join(breaking)}. "
            "Resuming with them would not continue the same run: put them back, or pass --allow_config_change "
            "to go on with the new settings"
        )
    if breaking:
        log.warning("resuming %s with changed settings (--allow_config_change): %s", checkpoint, "; ".join(breaking))
    if harmless:
        log.info("resuming %s with changed settings that leave the run as it was: %s", checkpoint, "; ".join(harmless))
