"""The training config: schema, YAML loading, CLI overrides and every check that needs no model.

The YAML format is axolotl's (flat training keys, ``rl: ebft``, an ``ebft:`` block, ``datasets:``),
so an axolotl EBFT config loads unchanged. Loading goes

    YAML file -> mapping -> ``--key.path=value`` overrides -> axolotl-compatibility pass -> pydantic

and every problem found on the way is reported together in one :class:`~ebft.errors.ConfigError`
whose message starts with the config file's path, one ``key.path: reason (got value)`` line per
problem. Key paths are dotted, list items by index (``datasets.0.path``), which is also the
override syntax.

Public API
----------
* :func:`load_config` ``(path, overrides=()) -> TrainConfig`` and :func:`parse_config` (same,
  from an already-parsed mapping).
* :func:`config_warnings` ``(cfg) -> list[str]``: **how warnings are exposed.** It returns the
  warnings found while loading (each accepted-but-unused axolotl key, a renamed key) followed by
  the ones that follow from the values (for example ``n_samples_per_prompt: 1`` falling back to
  reinforce). Nothing is printed or logged here; the CLI prints the list. The load-time part is
  kept in a private attribute of the returned config, so a config built in code
  (``TrainConfig(...)``) has only the value-derived warnings.
* :func:`dump_config` ``(cfg) -> str``: the resolved config as YAML; loading it again gives an
  equal config. Accepted-but-unused axolotl keys are not written (they change nothing).
* :data:`IGNORED_AXOLOTL_KEYS` (accepted, one warning each, no effect) and
  :data:`UNSUPPORTED_AXOLOTL_KEYS` (accepted only when off / empty; otherwise an error);
  :data:`UNSUPPORTED_TRL_KEYS` is the same for keys inside ``trl:`` (0 also counts as off).
* The schema: :class:`TrainConfig` and its sections :class:`EbftSection`, :class:`DatasetSpec`,
  :class:`TrlSection` (with :class:`GenerationKwargs`) and :class:`VllmSection`. ``cfg.trl`` and
  ``cfg.vllm`` are always section objects; ``trl: null`` in a file means all defaults.
* :func:`vllm_client_address` ``(cfg) -> (host, port)`` that training connects to, and
  :func:`vllm_serve_address` ``(cfg) -> (host, port)`` that ``ebft vllm-serve`` binds to.

Building :class:`TrainConfig` directly (``TrainConfig.model_validate(d)``) runs the same schema and
cross-field checks but raises pydantic's ValidationError and knows nothing of axolotl-only keys;
the loaders above are the user-facing path. ``==`` on configs compares settings only.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ebft.errors import ConfigError

__all__ = [
    "IGNORED_AXOLOTL_KEYS",
    "UNSUPPORTED_AXOLOTL_KEYS",
    "UNSUPPORTED_TRL_KEYS",
    "FSDP_IGNORED_KEYS",
    "FSDP_LIMITED_KEYS",
    "FsdpSection",
    "DatasetSpec",
    "EbftSection",
    "GenerationKwargs",
    "TrainConfig",
    "TrlSection",
    "VllmSection",
    "config_warnings",
    "dump_config",
    "load_config",
    "parse_config",
    "vllm_client_address",
    "vllm_serve_address",
]

_ATTENTION_CHOSEN_BY_EBFT = (
    "ebft picks the attention backend itself (SDPA with a boolean mask on CPU and for cached decoding, "
    "a flex_attention BlockMask for the training and feature passes on CUDA)"
)

# Axolotl keys that an axolotl config may carry but that change nothing here: key -> why / what
# ebft does instead. Each one present (and not null) gives one warning.
IGNORED_AXOLOTL_KEYS: dict[str, str] = {
    "flash_attention": _ATTENTION_CHOSEN_BY_EBFT,
    "flex_attention": _ATTENTION_CHOSEN_BY_EBFT,
    "sdp_attention": _ATTENTION_CHOSEN_BY_EBFT,
    "xformers_attention": _ATTENTION_CHOSEN_BY_EBFT,
    "attn_implementation": _ATTENTION_CHOSEN_BY_EBFT,
    "torch_compile": "ebft does not torch.compile the model; flex_attention compiles its own kernels",
    "torch_dtype": "the training precision is set by `bf16`",
    "tf32": "ebft leaves torch's TF32 matmul setting at its default",
    "model_type": "the model is always loaded with AutoModelForCausalLM",
    "tokenizer_type": "the tokenizer is always loaded with AutoTokenizer",
    "chat_template": "the tokenizer's own chat template is used by the chat transforms",
    "strict": "ebft always rejects unknown keys",
    "dataset_prepared_path": "datasets are tokenised in memory at start-up; nothing is cached at this path",
    "dataset_processes": "dataset transforms run in the training process",
    "pad_to_sequence_len": "micro-batches are padded to their longest document, not to sequence_len",
    "sample_packing": "packing is chosen per dataset with `datasets[].pack` (ebft_pretrain.transform)",
    "eval_sample_packing": "packing is chosen per dataset with `datasets[].pack` (ebft_pretrain.transform)",
    "train_on_inputs": "the dataset transform decides which tokens are CE targets (prompts never are)",
    "group_by_length": "ebft does not reorder the data by length",
    "remove_unused_columns": "each transform names the columns it removes (`remove_columns`)",
    "eval_steps": "there is no periodic evaluation during training; run `ebft evaluate` on a checkpoint",
    "evals_per_epoch": "there is no periodic evaluation during training; run `ebft evaluate` on a checkpoint",
    "eval_table_size": "there is no periodic evaluation during training; run `ebft evaluate` on a checkpoint",
    "early_stopping_patience": "ebft has no early stopping; training runs for max_steps / num_epochs",
    "saves_per_epoch": "checkpoints are written every `save_steps` optimizer steps",
    "save_strategy": "checkpoints are written every `save_steps` optimizer steps",
    "save_safetensors": "checkpoints are always written as safetensors",
    "wandb_watch": "not supported; gradients and parameters are not sent to wandb",
    "wandb_log_model": "not supported; checkpoints stay in output_dir",
    "wandb_run_id": "not supported here; set the WANDB_RUN_ID environment variable instead",
    "wandb_mode": "not supported here; set the WANDB_MODE environment variable instead",
    "ddp": "multi-process training is set up by `accelerate launch`, not by this key",
    "device_map": "each process places the model on its own device (accelerate); no device_map",
    "local_rank": "set by the launcher",
}

# Axolotl keys naming something ebft cannot do. Accepted only when off (null, false, empty);
# any other value is an error with this reason.
UNSUPPORTED_AXOLOTL_KEYS: dict[str, str] = {
    "fp16": "fp16 training is not supported; use `bf16: true` or `bf16: false` (fp32)",
    "load_in_8bit": "quantised (8-bit) base models are not supported",
    "load_in_4bit": "quantised (4-bit) base models are not supported",
    "gptq": "GPTQ-quantised base models are not supported",
    "deepspeed": "DeepSpeed is not supported; run multi-GPU with `accelerate launch -m ebft train ...`",
    "activation_offloading": "activation offloading is not implemented (and axolotl rejects it with flex_attention)",
    "lora_model_dir": "starting from an existing LoRA adapter is not supported",
    "auto_resume_from_checkpoints": "use `resume_from_checkpoint: latest`",
    "hub_model_id": "ebft never uploads to the Hub; push output_dir yourself",
    "push_to_hub": "ebft never uploads to the Hub; push output_dir yourself",
}

# Dataset transforms shipped with the EBFT docs, by the mode whose rows they produce. A transform
# of the other mode cannot work, so the pairing is checked before any data loads.
_STRIDED_TRANSFORM_MODULES = ("ebft_pretrain", "ebft_strided_structured", "ebft_strided_chat")
_STRIDED_TRANSFORMS = ("ebft_reasoning.transform_strided",)
_STRUCTURED_TRANSFORM_MODULES = ("ebft_opencode", "ebft_chat_multiturn", "ebft_reasoning")

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")
_DOTTED_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class _Problems(ValueError):
    """Several problems found by one validator, as (key path relative to the model, reason)."""

    def __init__(self, items: list[tuple[str, str]]):
        super().__init__("; ".join(f"{path}: {reason}" for path, reason in items))
        self.items = items


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _str_or_str_list(value: Any) -> str | list[str]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")


# One error message instead of one per union member (which is what a plain `str | list[str]` gives).
_StrOrStrList = Annotated[str | list[str], PlainValidator(_str_or_str_list, json_schema_input_type=str | list[str])]
_Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    # Unknown keys are errors everywhere; NaN/inf never make sense in this config.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EbftSection(_Section):
    """The ``ebft:`` block: EBFT mode, feature network, reward, and the strided rollout layout."""

    mode: Literal["structured", "strided"] = Field(
        "structured",
        description="structured: prompt/ground-truth rows, full completions per prompt. "
        "strided: short rollouts at many anchors inside each document (paper Section F).",
    )
    feature_layers: list[_Fraction] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        min_length=1,
        description="Depths of the feature layers as fractions of the layer count, each in [0, 1]; "
        "layer index int(f * num_layers), 0.0 = embedding output, 1.0 = last layer.",
    )
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = Field(
        "last_token",
        description="How token features are pooled into one vector per sequence or block: last valid token, "
        "mean over valid tokens, mean over completion tokens, or the tokens at 25/50/75% concatenated.",
    )
    feature_norm: Literal["per_layer", "joint", "none"] = Field(
        "per_layer",
        description="L2 normalisation of the hidden states: each layer before concatenation (per_layer), "
        "the concatenation (joint), or none.",
    )
    use_whitening: bool = Field(
        False, description="Whiten the pooled features of each group of samples (SVD) before the reward."
    )
    whitening_space: Literal["feature", "sample"] = Field(
        "feature",
        description="Whitening operator: in feature space (paper eq. 8) or in the samples' row space "
        "(the paper's code). Only used with use_whitening.",
    )
    alignment_coef: float = Field(
        1.0,
        description="Weight of the alignment term 2*cos(phi_gen, phi_gt) in the reward (any finite number).",
    )
    diversity_coef: float = Field(
        1.0,
        description="Weight of the diversity penalty 2/(n-1) * sum of dot products with the other samples "
        "(any finite number; 0 disables it).",
    )
    ce_coef: float = Field(0.0, ge=0.0, description="Weight of the cross-entropy loss on ground-truth tokens (>= 0).")
    rl_coef: float = Field(1.0, ge=0.0, description="Weight of the policy-gradient loss (>= 0).")
    adaptive_max_tokens: bool = Field(
        True,
        description="Structured mode: cap each prompt's completion length at gt_length_multiplier times its "
        "ground-truth length.",
    )
    gt_length_multiplier: float = Field(
        1.5, ge=0.1, description="Structured mode: multiplier for adaptive_max_tokens (>= 0.1)."
    )
    stride: int = Field(8, ge=1, description="Strided mode: tokens between consecutive anchors (>= 1).")
    context_length: int = Field(
        8,
        ge=1,
        description="Strided mode: position of the first anchor in raw text (>= 1). Each block conditions on "
        "the whole prefix before its anchor; this is not a window size.",
    )
    generate_max_len: int = Field(8, ge=1, description="Strided mode: tokens generated per block (>= 1).")
    n_samples_per_prompt: int = Field(
        4,
        ge=1,
        description="Strided mode: independent rollouts per document (>= 1; >= 2 for rloo/group_norm).",
    )
    temperature: float = Field(0.6, ge=0.0, description="Strided mode: sampling temperature (>= 0; 0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Strided mode: nucleus sampling threshold, in (0, 1].")
    advantage_estimator: Literal["rloo", "group_norm", "reinforce"] = Field(
        "rloo",
        description="Strided mode: rloo (leave-one-out baseline), group_norm ((r - mean) / std) or "
        "reinforce (raw reward).",
    )
    min_completion_prefix: int = Field(
        0,
        ge=0,
        description="Strided mode, rows with a prompt: the first anchor is at least this many tokens into "
        "the completion (>= 0).",
    )
    feature_device: str | None = Field(
        None,
        description="Device of a separate frozen feature network ('cpu', 'cuda', 'cuda:N', 'mps'); "
        "null = the policy's device.",
    )
    log_rollouts: bool = Field(False, description="Write sampled rollouts to a JSON-lines file in output_dir.")

    @field_validator("feature_device")
    @classmethod
    def _device_name(cls, value: str | None) -> str | None:
        if value is not None and not _DEVICE.match(value):
            raise ValueError("must be 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return value

    @model_validator(mode="after")
    def _something_to_train(self) -> EbftSection:
        if self.rl_coef == 0 and self.ce_coef == 0:
            raise _Problems([("rl_coef", "rl_coef and ce_coef are both 0, so the loss is always 0")])
        return self


class DatasetSpec(_Section):
    """One entry of ``datasets:``."""

    path: str = Field(
        min_length=1, description="Hub dataset id, or a local file or directory (json, jsonl, parquet, txt)."
    )
    type: str | None = Field(
        None,
        description="Transform as 'module.function': a built-in (ebft_pretrain.transform, "
        "ebft_strided_structured.transform, ebft_strided_chat.transform, ...) or an importable dotted path.",
    )
    split: str = Field("train", min_length=1, description="Split to load, slices allowed (e.g. 'train[:1%]').")
    data_files: _StrOrStrList | None = Field(None, description="File(s) inside `path` to load, as for datasets.")
    name: str | None = Field(None, description="Dataset configuration name (the `name` of load_dataset).")
    field: str | None = Field(
        None,
        description="ebft_pretrain.transform: the text column; default the first of text/content/question that exists.",
    )
    pack: bool | None = Field(
        None,
        description="ebft_pretrain.transform only: true (default) packs documents into sequence_len chunks "
        "with EOS between them; false pads each document on its own.",
    )

    @field_validator("type")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and not _DOTTED_NAME.match(value):
            raise ValueError("must be a 'module.function' name, e.g. 'ebft_pretrain.transform'")
        return value

    @model_validator(mode="after")
    def _pack_only_for_pretrain(self) -> DatasetSpec:
        if self.pack is not None and (self.type is None or not self.type.startswith("ebft_pretrain.")):
            raise _Problems([("pack", f"only ebft_pretrain.transform packs documents (type is {self.type!r})")])
        return self


# trl: keys that TRL / axolotl configs may carry but that name something ebft cannot do. Accepted only
# when off (null, false, 0, empty) and then dropped; any other value is an error with this reason.
UNSUPPORTED_TRL_KEYS: dict[str, str] = {
    "beta": "EBFT has no reference-model KL penalty; the feature-matching reward plays that role",
    "sync_ref_model": "there is no reference model to keep in sync (EBFT has no KL penalty)",
    "ref_model_sync_steps": "there is no reference model to keep in sync (EBFT has no KL penalty)",
    "vllm_enable_sleep_mode": "sleep mode is for vLLM colocated with training; ebft runs vLLM as a separate server",
    "use_liger_loss": "the Liger fused GRPO loss is not supported; ebft computes its own policy loss",
    "reward_funcs": "the reward is feature matching against the ground truth; ebft takes no reward functions",
    "reward_weights": "the reward is feature matching against the ground truth; ebft takes no reward functions",
}

# Sampling settings people put in generation_kwargs (vLLM's SamplingParams names) -> the trl key
# that holds them here, so each setting has exactly one place.
_SAMPLING_KWARG_TRL_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_tokens": "max_completion_length",
    "max_new_tokens": "max_completion_length",
    "max_completion_length": "max_completion_length",
}

_BIND_ALL_HOSTS = ("0.0.0.0", "::")
_Port = Annotated[int, Field(ge=1, le=65535)]


class GenerationKwargs(_Section):
    """``trl.generation_kwargs``: extra sampling settings; only stop tokens, the rest are trl keys."""

    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="Token ids that end a completion, in addition to the tokenizer's EOS "
        "(e.g. [151645, 151643] for Qwen's <|im_end|> and <|endoftext|>); null = EOS only.",
    )


class TrlSection(_Section):
    """The ``trl:`` block: structured mode's sampling, vLLM client and policy-loss settings."""

    num_generations: int = Field(
        4,
        ge=1,
        description="Completions sampled per prompt, the group its advantages compare (>= 1; structured "
        "mode needs >= 2).",
    )
    max_completion_length: int = Field(256, ge=1, description="Most tokens generated per completion (>= 1).")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature (>= 0; 0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold, in (0, 1]; 1 = off.")
    top_k: int | None = Field(
        None,
        ge=-1,
        description="Sample from the k most likely tokens; 0, -1 or null = off (stored as null).",
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Drop tokens below min_p times the top token's probability, in [0, 1]; null or 0 = off.",
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, description="Penalty on tokens already in the prompt or completion (> 0; 1 = off)."
    )
    use_vllm: bool = Field(
        False,
        description="Sample completions from a vLLM server (`ebft vllm-serve CFG`) instead of transformers "
        "generate on the training device.",
    )
    vllm_mode: Literal["server", "colocate"] = Field(
        "server", description="How vLLM runs: only 'server' (a separate process) is supported."
    )
    vllm_server_host: str | None = Field(
        None, min_length=1, description="Host of the vLLM server to connect to; null = vllm.host."
    )
    vllm_server_port: _Port | None = Field(None, description="Port of the vLLM server, 1..65535; null = vllm.port.")
    vllm_server_timeout: float = Field(
        240.0,
        gt=0.0,
        description="Seconds to wait for the vLLM server to come up, and for each request (> 0).",
    )
    vllm_lora_sync: bool = Field(
        False,
        description="Sync the policy to the vLLM server by saving the LoRA adapter and hot-loading it "
        "(required with use_vllm).",
    )
    vllm_sync_interval: int = Field(
        1, ge=1, description="Optimizer steps between policy syncs to the vLLM server (>= 1)."
    )
    vllm_importance_sampling_correction: bool = Field(
        True,
        description="Reweight the policy gradient by the ratio of training to sampling probabilities when "
        "rollouts come from vLLM or an older policy (async).",
    )
    vllm_importance_sampling_cap: float = Field(
        3.0,
        gt=1.0,
        description="Importance weights are clamped to [1/cap, cap] (> 1).",
    )
    use_data_producer: bool | None = Field(
        None,
        description="Accepted for axolotl configs; ebft always builds rollout batches in its own training loop.",
    )
    async_prefetch: bool = Field(
        False,
        description="Generate the next rollout batch on the vLLM server while training on the current one "
        "(needs use_vllm).",
    )
    streaming_partial_batch: bool = Field(
        False, description="Accepted for axolotl configs; ebft scores each rollout batch once it is complete."
    )
    skip_zero_advantage_batches: bool = Field(
        False, description="Skip the update for a micro-batch whose advantages are all zero."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the reward std of each prompt's group ('group', or true), of the "
        "whole batch ('batch'), or not at all ('none', or false).",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="How token losses are averaged: grpo (per completion, then over completions), bnpo "
        "(over the micro-batch's tokens), dr_grpo (by a constant max_completion_length), dapo (over the "
        "step's tokens).",
    )
    epsilon: float = Field(0.2, gt=0.0, description="Lower clipping range of the policy ratio (> 0).")
    epsilon_high: float | None = Field(
        None, description="Upper clipping range of the policy ratio (>= epsilon); null = epsilon."
    )
    num_iterations: int = Field(
        1, ge=1, description="Policy updates per rollout batch (>= 1); above 1 the ratio is clipped."
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions that hit max_completion_length out of the policy loss."
    )
    generation_kwargs: GenerationKwargs = Field(
        default_factory=GenerationKwargs,
        description="Extra sampling settings; only stop_token_ids (the others are trl keys of their own).",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for tokenizer.apply_chat_template when rendering prompts "
        "(e.g. enable_thinking: false).",
    )
    log_completions: bool = Field(False, description="Print sampled completions while training.")
    num_completions_to_print: int | None = Field(
        None, ge=0, description="How many completions log_completions prints per step (>= 0); null = all."
    )

    @property
    def clip_high(self) -> float:
        """The upper clipping range: epsilon_high, or epsilon when that is not set."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @field_validator("generation_kwargs", "chat_template_kwargs", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        # An axolotl file often writes the key with nothing after it.
        return {} if value is None else value

    @field_validator("top_k")
    @classmethod
    def _one_spelling_of_off(cls, value: int | None) -> int | None:
        # transformers spells "no top-k" 0 and vLLM -1; one stored spelling serves both backends.
        return None if value in (0, -1) else value

    @field_validator("vllm_mode")
    @classmethod
    def _server_only(cls, value: str) -> str:
        if value == "colocate":
            raise ValueError(
                "ebft runs vLLM as a separate server (`ebft vllm-serve CFG`); colocate mode is not supported"
            )
        return value

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _scale_rewards_from_bool(cls, value: Any) -> Any:
        # TRL's older boolean spelling, still used by axolotl configs.
        if isinstance(value, bool):
            return "group" if value else "none"
        if value not in get_args(cls.model_fields["scale_rewards"].annotation):
            raise ValueError("must be true, false, 'group', 'batch' or 'none'")
        return value


# fsdp_config keys of axolotl's FSDP2 config that change nothing here: key -> why. A key set to
# anything but off gives one warning.
FSDP_IGNORED_KEYS: dict[str, str] = {
    "cpu_ram_efficient_loading": "every process loads the whole model on CPU and FSDP then shards it; "
    "loading the weights on the main process only is not implemented",
    "sync_module_states": "every process loads the same weights from disk, so they start in sync",
    "use_orig_params": "FSDP2 always trains the original parameters",
    "backward_prefetch": "an FSDP1 setting; FSDP2 prefetches the next layer by itself",
    "forward_prefetch": "an FSDP1 setting; FSDP2 prefetches the next layer by itself",
    "limit_all_gathers": "an FSDP1 setting; FSDP2 limits in-flight all-gathers by itself",
}

# fsdp_config keys naming something ebft's FSDP2 cannot do: key -> (values accepted, why).
FSDP_LIMITED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "auto_wrap_policy": (
        ("TRANSFORMER_BASED_WRAP",),
        "ebft shards each decoder layer, and the rest of the model as one group (TRANSFORMER_BASED_WRAP)",
    ),
    "state_dict_type": (
        ("FULL_STATE_DICT",),
        "checkpoints always hold whole HF-format weights, gathered on the main process",
    ),
    "sharding_strategy": (("FULL_SHARD", 1), "only FULL_SHARD is implemented"),
    "offload_params": ((False,), "offloading parameters to CPU is not implemented"),
    "activation_checkpointing": ((False,), "set gradient_checkpointing: true instead (the same recomputation)"),
    "mixed_precision_policy": ((), "the precision is set by `bf16` (autocast over fp32 weights)"),
    "mixed_precision": ((), "the precision is set by `bf16` (autocast over fp32 weights)"),
}


class FsdpSection(_Section):
    """The ``fsdp_config:`` block with ``fsdp_version: 2`` (axolotl's keys; ``fsdp_``-prefixed ones too)."""

    reshard_after_forward: bool = Field(
        True,
        description="Free each decoder layer's gathered weights after its forward and gather them again in "
        "backward (less memory, more communication).",
    )
    transformer_layer_cls_to_wrap: str | None = Field(
        None,
        description="The decoder layer class the config expects (checked against the model); ebft shards "
        "every layer of the decoder body whatever this says.",
    )


class VllmSection(_Section):
    """The ``vllm:`` block: the vLLM server that ``ebft vllm-serve`` starts, and its address."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the server binds to, and that training connects to unless trl.vllm_server_host "
        "is set (0.0.0.0 / :: bind all interfaces and are reached at 127.0.0.1).",
    )
    port: _Port = Field(8000, description="Port of the server, 1..65535.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction of the server GPU's memory vLLM may use, in (0, 1]."
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="Longest prompt + completion the server accepts (>= sequence_len); null = the model's own.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the server splits the model over (>= 1).")
    enforce_eager: bool = Field(
        False, description="Run the server without CUDA graphs (needed by some hybrid-attention models)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight dtype on the server; auto = the model's own."
    )


def vllm_client_address(cfg: TrainConfig) -> tuple[str, int]:
    """(host, port) that training connects to: the trl.vllm_server_* keys, else the ``vllm:`` block.

    A bind-all address (0.0.0.0, ::) says where the server listens, not where to reach it, so it is
    reached on this machine at 127.0.0.1.
    """
    host = cfg.trl.vllm_server_host or cfg.vllm.host
    port = cfg.trl.vllm_server_port or cfg.vllm.port
    return ("127.0.0.1" if host in _BIND_ALL_HOSTS else host), port


def vllm_serve_address(cfg: TrainConfig) -> tuple[str, int]:
    """(host, port) that ``ebft vllm-serve`` binds to.

    The ``vllm:`` block decides; an axolotl config often names the address only in the trl block
    (``trl.vllm_server_host: 0.0.0.0``), so a trl value is used where the vllm one was left at its
    default and the server then listens where training will look for it.
    """
    defaults = VllmSection()
    host, port = cfg.vllm.host, cfg.vllm.port
    if cfg.trl.vllm_server_host is not None and host == defaults.host:
        host = cfg.trl.vllm_server_host
    if cfg.trl.vllm_server_port is not None and port == defaults.port:
        port = cfg.trl.vllm_server_port
    return host, port


def _transform_mode(transform: str | None) -> str | None:
    """The mode whose rows a known built-in transform produces; None for custom or no transform."""
    if transform is None:
        return None
    module = transform.split(".")[0]
    if transform in _STRIDED_TRANSFORMS or module in _STRIDED_TRANSFORM_MODULES:
        return "strided"
    if module in _STRUCTURED_TRANSFORM_MODULES:
        return "structured"
    return None


class TrainConfig(_Section):
    """The whole config file. Field order is the order of :func:`dump_config`."""

    # Model
    base_model: str = Field(
        min_length=1,
        description="Hub id, local directory or .gguf file of the causal LM to fine-tune (a .gguf file is "
        "dequantized once into a cached folder, $EBFT_CACHE or ~/.cache/ebft; needs pip install 'ebft[gguf]').",
    )
    tokenizer_config: str | None = Field(
        None, description="Hub id, directory or .gguf file of the tokenizer; default base_model."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repository.")
    special_tokens: dict[str, str] | None = Field(
        None,
        description="Tokens to set on the tokenizer: any of bos_token, eos_token, pad_token, unk_token.",
    )

    # Method
    rl: Literal["ebft"] = Field(description="Training method; must be 'ebft'.")
    ebft: EbftSection = Field(description="EBFT settings (the `ebft:` block).")
    trl: TrlSection = Field(
        default_factory=TrlSection,
        description="Structured mode: sampling, vLLM client and policy-loss settings (the `trl:` block).",
    )
    vllm: VllmSection = Field(
        default_factory=VllmSection,
        description="Structured mode: the vLLM server of `ebft vllm-serve` (the `vllm:` block).",
    )

    # Data
    datasets: list[DatasetSpec] = Field(min_length=1, description="Training datasets, concatenated in order.")
    val_set_size: float = Field(
        0.0,
        ge=0.0,
        description="Held-out validation rows: 0 = none; in (0, 1) = that fraction of the rows; "
        ">= 1 = that many rows (a whole number).",
    )
    sequence_len: int = Field(2048, ge=1, description="Maximum tokens per document (>= 1).")

    # Schedule
    micro_batch_size: int = Field(1, ge=1, description="Documents (or prompts) per device per forward (>= 1).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step (>= 1).")
    num_epochs: float = Field(1.0, gt=0.0, description="Passes over the training data (> 0); max_steps wins if set.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (>= 1); null = from num_epochs.")

    # Optimizer
    learning_rate: float = Field(1e-5, gt=0.0, description="Peak learning rate (> 0).")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "sgd"] = Field(
        "adamw_torch", description="Optimizer: adamw_torch, adamw_torch_fused or sgd."
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (>= 0); set this or warmup_ratio.")
    warmup_ratio: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Warmup as a fraction of all steps, in [0, 1); set this or warmup_steps.",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (>= 0).")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1, in [0, 1).")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam beta2, in [0, 1).")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="Adam epsilon (> 0).")
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the gradient norm to this value (> 0); null = no clipping."
    )
    seed: int = Field(42, ge=0, description="Random seed for data order, sampling and initialisation (>= 0).")

    # LoRA
    adapter: Literal["lora"] | None = Field(None, description="'lora' trains a LoRA adapter; null = all weights.")
    lora_r: int = Field(8, ge=1, description="LoRA rank (>= 1).")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (>= 1); the scale is alpha / r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1).")
    lora_target_modules: _StrOrStrList | None = Field(
        None, description="Modules to adapt: a list of module names, or one regular expression (as in PEFT)."
    )
    lora_target_linear: bool | None = Field(None, description="Adapt every linear layer except the output head.")

    # Precision and memory
    bf16: Literal[True, False, "auto"] = Field(
        "auto",
        description="bfloat16 training: true, false (fp32) or auto (bf16 where the device supports it).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Keyword arguments for gradient checkpointing (e.g. use_reentrant)."
    )
    fsdp_version: Literal[2] | None = Field(
        None,
        description="2: shard the policy with FSDP2 over the processes of `accelerate launch` / torchrun; "
        "null: every process holds the whole model (DDP-style).",
    )
    fsdp_config: FsdpSection | None = Field(None, description="FSDP2 settings (with fsdp_version: 2).")

    # Output
    output_dir: str = Field("./outputs/ebft", min_length=1, description="Directory for checkpoints and logs.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many optimizer steps (>= 1).")
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every this many optimizer steps (>= 1); null = only at the end."
    )
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep at most this many checkpoint-N folders (the newest); null = keep all."
    )
    resume_from_checkpoint: str | None = Field(
        None,
        min_length=1,
        description="Continue a run from a checkpoint folder, or `latest` for the newest one in output_dir.",
    )
    max_consecutive_skipped_steps: int = Field(
        10,
        ge=1,
        description="Stop (saving the last good state) after this many consecutive steps whose loss, reward "
        "or gradient was not finite; each such step is skipped without an update.",
    )
    use_tensorboard: bool = Field(False, description="Also log metrics to TensorBoard in output_dir.")
    wandb_project: str | None = Field(None, description="Weights & Biases project; null = no wandb logging.")
    wandb_entity: str | None = Field(None, description="Weights & Biases entity (team or user).")
    wandb_name: str | None = Field(None, description="Weights & Biases run name.")

    # Warnings found while loading the file (ignored axolotl keys, renamed keys); see config_warnings.
    _load_warnings: list[str] = PrivateAttr(default_factory=list)

    def __eq__(self, other: object) -> bool:
        # Two configs are equal when they configure the same run; how the file was spelled (which
        # produced the load-time warnings) is not part of that.
        if not isinstance(other, TrainConfig):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    def to_dict(self) -> dict[str, Any]:
        """All settings as plain Python values (nested dicts and lists), e.g. for experiment trackers."""
        return self.model_dump()

    @field_validator("trl", "vllm", mode="before")
    @classmethod
    def _null_section_is_defaults(cls, value: Any) -> Any:
        # `trl:` with nothing after it is common in axolotl files and means "no settings".
        return {} if value is None else value

    @field_validator("special_tokens")
    @classmethod
    def _known_special_tokens(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        problems = [
            (name, _unknown_key_reason(name, _SPECIAL_TOKEN_NAMES))
            for name in (value or {})
            if name not in _SPECIAL_TOKEN_NAMES
        ]
        problems += [(name, "must be a non-empty string") for name, tok in (value or {}).items() if tok == ""]
        if problems:
            raise _Problems(problems)
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        problems: list[tuple[str, str]] = []
        if self.fsdp_version == 2 and self.fsdp_config is None:
            self.fsdp_config = FsdpSection()
        if self.fsdp_config is not None and self.fsdp_version != 2:
            problems.append(("fsdp_config", "needs fsdp_version: 2 (ebft implements FSDP2 only)"))
        if self.fsdp_version == 2 and self.ebft.mode == "structured" and self.trl.use_vllm:
            problems.append(
                (
                    "fsdp_version",
                    "cannot be combined with trl.use_vllm: the adapter sync to the vLLM server reads unsharded "
                    "weights; use the transformers generate backend (use_vllm: false)",
                )
            )
        e = self.ebft
        if e.mode == "strided" and e.context_length + e.generate_max_len > self.sequence_len:
            problems.append(
                (
                    "sequence_len",
                    (
                        f"no strided block fits: needs ebft.context_length + ebft.generate_max_len = "
                        f"{e.context_length} + {e.generate_max_len} = {e.context_length + e.generate_max_len} "
                        f"tokens (got {self.sequence_len})"
                    ),
                )
            )
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append(("warmup_steps", "set warmup_steps or warmup_ratio, not both"))
        if self.val_set_size >= 1 and self.val_set_size != int(self.val_set_size):
            problems.append(
                (
                    "val_set_size",
                    f"from 1 up it counts rows, so it must be a whole number (got {self.val_set_size})",
                )
            )
        if self.adapter == "lora" and not self.lora_target_linear and not self.lora_target_modules:
            problems.append(("adapter", "set lora_target_linear: true or lora_target_modules"))
        if e.mode == "structured":
            problems += self._structured_problems()
        for i, spec in enumerate(self.datasets):
            made_for = _transform_mode(spec.type)
            if made_for is not None and made_for != e.mode:
                problems.append(
                    (
                        f"datasets.{i}.type",
                        (
                            f"{spec.type!r} produces {made_for}-mode rows but ebft.mode is {e.mode!r}; "
                            f"set ebft.mode: {made_for} or use a {e.mode}-mode transform"
                        ),
                    )
                )
        if problems:
            raise _Problems(problems)
        return self

    def _structured_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        trl = self.trl
        # An optimizer step must take whole groups of completions (TRL's rule for one process;
        # axolotl's own examples use micro_batch_size 1 with 4 accumulation steps).
        if (self.micro_batch_size * self.gradient_accumulation_steps) % trl.num_generations:
            problems.append(
                (
                    "micro_batch_size",
                    f"micro_batch_size * gradient_accumulation_steps = {self.micro_batch_size} * "
                    f"{self.gradient_accumulation_steps} must be a multiple of trl.num_generations "
                    f"= {trl.num_generations}",
                )
            )
        if trl.num_generations < 2:
            problems.append(
                (
                    "trl.num_generations",
                    "must be >= 2 in structured mode: group advantages compare the completions of one "
                    f"prompt (got {trl.num_generations})",
                )
            )
        if trl.max_completion_length >= self.sequence_len:
            problems.append(
                (
                    "trl.max_completion_length",
                    f"must be less than sequence_len = {self.sequence_len} to leave room for the prompt "
                    f"(got {trl.max_completion_length})",
                )
            )
        if trl.epsilon_high is not None and trl.epsilon_high < trl.epsilon:
            problems.append(("trl.epsilon_high", f"must be >= trl.epsilon = {trl.epsilon} (got {trl.epsilon_high})"))
        why_lora_sync = (
            "ebft syncs the policy to the vLLM server by saving the LoRA adapter and hot-loading it "
            "(full-weight sync is not supported), so otherwise the server would sample from the base model "
            "for the whole run"
        )
        if trl.use_vllm and self.adapter != "lora":
            problems.append(("trl.use_vllm", f"needs adapter: lora; {why_lora_sync} (got adapter: null)"))
        if trl.use_vllm and not trl.vllm_lora_sync:
            problems.append(("trl.vllm_lora_sync", f"must be true with trl.use_vllm: true; {why_lora_sync}"))
        if trl.async_prefetch and not trl.use_vllm:
            problems.append(
                (
                    "trl.async_prefetch",
                    "needs trl.use_vllm: true; with transformers generate the rollouts run on the training "
                    "device, so there is nothing to overlap with training",
                )
            )
        if self.vllm.max_model_len is not None and self.vllm.max_model_len < self.sequence_len:
            problems.append(
                (
                    "vllm.max_model_len",
                    f"must be >= sequence_len = {self.sequence_len}, or the server rejects the longest "
                    f"prompt + completion (got {self.vllm.max_model_len})",
                )
            )
        return problems


# ---------------------------------------------------------------------------------------------
# Warnings that follow from the values


_LORA_DEFAULTS = {
    name: TrainConfig.model_fields[name].default
    for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear")
}
_STRIDED_LAYOUT_KEYS = ("stride", "context_length", "generate_max_len", "min_completion_prefix")
_STRUCTURED_ONLY_KEYS = ("adaptive_max_tokens", "gt_length_multiplier")
# ebft sampling keys of strided mode -> the trl key that does their job in structured mode.
_STRIDED_SAMPLING_KEYS = {
    "n_samples_per_prompt": "num_generations",
    "temperature": "temperature",
    "top_p": "top_p",
    "advantage_estimator": "scale_rewards",
}
_TRL_VLLM_ONLY_KEYS = (
    "vllm_server_host",
    "vllm_server_port",
    "vllm_server_timeout",
    "vllm_lora_sync",
    "vllm_sync_interval",
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_cap",
)


def _value_warnings(cfg: TrainConfig) -> list[str]:
    # Value-based (not "was the key written") so that a dumped and reloaded config warns the same.
    e = cfg.ebft
    defaults = EbftSection()
    out: list[str] = []
    if e.mode == "strided":
        if e.n_samples_per_prompt == 1:
            if e.advantage_estimator in ("rloo", "group_norm"):
                out.append(
                    f"ebft.advantage_estimator: {e.advantage_estimator} needs n_samples_per_prompt >= 2; "
                    "with 1 sample it falls back to reinforce (advantage = raw reward)"
                )
            if e.diversity_coef != 0:
                out.append("ebft.diversity_coef: diversity disabled, it needs n_samples_per_prompt >= 2")
        if e.temperature == 0:
            out.append(
                "ebft.temperature: 0 means greedy decoding; all samples of a block are identical, so "
                "every advantage and the RL term are zero (only the CE term trains)"
            )
        out += [
            f"ebft.{key}: used only in structured mode; ignored in strided mode"
            for key in _STRUCTURED_ONLY_KEYS
            if getattr(e, key) != getattr(defaults, key)
        ]
        out += [
            f"{block}: used only in structured mode; ignored in strided mode"
            for block, default in (("trl", TrlSection()), ("vllm", VllmSection()))
            if getattr(cfg, block) != default
        ]
    else:
        out += [
            f"ebft.{key}: used only in strided mode; ignored in structured mode"
            for key in _STRIDED_LAYOUT_KEYS
            if getattr(e, key) != getattr(defaults, key)
        ]
        out += [
            f"ebft.{key}: used only in strided mode; structured mode uses trl.{trl_key}"
            for key, trl_key in _STRIDED_SAMPLING_KEYS.items()
            if getattr(e, key) != getattr(defaults, key)
        ]
        out += _trl_warnings(cfg.trl)
    if e.alignment_coef == 0 and e.diversity_coef == 0 and e.rl_coef > 0:
        out.append("ebft.alignment_coef: alignment_coef and diversity_coef are both 0, so every reward is 0")
    if e.whitening_space != defaults.whitening_space and not e.use_whitening:
        out.append("ebft.whitening_space: has no effect without ebft.use_whitening: true")
    if cfg.adapter is None:
        out += [
            f"{key}: has no effect without adapter: lora"
            for key, default in _LORA_DEFAULTS.items()
            if getattr(cfg, key) != default
        ]
    if cfg.gradient_checkpointing_kwargs is not None and not cfg.gradient_checkpointing:
        out.append("gradient_checkpointing_kwargs: has no effect without gradient_checkpointing: true")
    if cfg.lr_scheduler == "constant" and (cfg.warmup_steps or cfg.warmup_ratio):
        out.append("lr_scheduler: 'constant' has no warmup; use 'constant_with_warmup' to warm up")
    if cfg.max_steps is not None and cfg.num_epochs != TrainConfig.model_fields["num_epochs"].default:
        out.append(f"num_epochs: ignored because max_steps = {cfg.max_steps} is set")
    out += [
        f"{key}: has no effect without wandb_project"
        for key in ("wandb_entity", "wandb_name")
        if getattr(cfg, key) is not None and cfg.wandb_project is None
    ]
    return out


def _trl_warnings(trl: TrlSection) -> list[str]:
    """Warnings about the trl block of a structured-mode config."""
    defaults = TrlSection()
    out: list[str] = []
    if trl.repetition_penalty != 1:
        out.append(
            "trl.repetition_penalty: completions are sampled with the penalty but scored without it "
            "(like TRL), so the policy gradient is slightly off-policy"
        )
    if trl.use_data_producer:
        out.append(
            "trl.use_data_producer: not needed; ebft always builds each rollout batch inside its own "
            "training loop (sync and async alike)"
        )
    if trl.streaming_partial_batch:
        out.append("trl.streaming_partial_batch: no effect; ebft scores each rollout batch once it is complete")
    if trl.num_completions_to_print is not None and not trl.log_completions:
        out.append("trl.num_completions_to_print: has no effect without trl.log_completions: true")
    if not trl.use_vllm:
        out += [
            f"trl.{key}: has no effect without trl.use_vllm: true"
            for key in _TRL_VLLM_ONLY_KEYS
            if getattr(trl, key) != getattr(defaults, key)
        ]
    return out


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Everything worth telling the user about ``cfg``, one ``key.path: message`` line each."""
    return [*cfg._load_warnings, *_value_warnings(cfg)]


# ---------------------------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let the base class report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error(where: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ConfigError(f"{where}: malformed YAML{at}: {problem}")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read, override and validate the YAML config at ``path``; raises ConfigError on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the config file ({exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None
    return parse_config(data, source=source, overrides=overrides)


def parse_config(data: Any, source: str = "<config>", overrides: Sequence[str] = ()) -> TrainConfig:
    """Validate an already-parsed config mapping; ``source`` names it in error messages."""
    if not isinstance(data, Mapping):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values (got {got})")
    raw = copy.deepcopy(dict(data))
    for text in overrides:
        _apply_override(raw, text, source)
    notes, problems = _axolotl_compat(raw)
    cfg = None
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems += _problem_lines(exc)
    if problems:
        where = source + (f" (with overrides {' '.join(overrides)})" if overrides else "")
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise ConfigError(f"{where}: invalid config, {count}:\n" + "\n".join(f"  {p}" for p in problems))
    assert cfg is not None
    cfg._load_warnings = notes
    return cfg


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config (every key, defaults filled in) as YAML that :func:`load_config` reads back."""
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True, default_flow_style=None)


# ---------------------------------------------------------------------------------------------
# Overrides


def _apply_override(raw: dict[str, Any], text: str, source: str) -> None:
    """Apply one ``--key.path=value`` to ``raw`` in place; the value is parsed as YAML."""
    syntax = f"{source}: override {text!r}: expected --key.path=value, e.g. --ebft.stride=4 or --datasets.0.path=x"
    if not text.startswith("--") or "=" not in text:
        raise ConfigError(syntax)
    key, _, value_text = text[2:].partition("=")
    # axolotl's CLI spells keys with dashes (--ebft.context-length); keys here never contain one.
    parts = [part.replace("-", "_") for part in key.split(".")]
    if not all(parts):
        raise ConfigError(syntax)
    try:
        value = yaml.load(value_text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise _yaml_error(f"{source}: override {text!r}", exc) from None

    node: Any = raw
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            elif not isinstance(node.get(part), (dict, list)):
                if node.get(part) is not None:
                    raise ConfigError(f"{source}: override {text!r}: {here} is a single value, not a section")
                node[part] = {}
            if not last:
                node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"{source}: override {text!r}: {here}: no such list item "
                    f"(the list has {len(node)} item{'s' if len(node) != 1 else ''}, indices from 0)"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            raise ConfigError(f"{source}: override {text!r}: {'.'.join(parts[:depth])} is a single value")


# ---------------------------------------------------------------------------------------------
# axolotl compatibility


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == "" or value == {} or value == []


def _axolotl_compat(raw: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Strip axolotl-only keys from ``raw`` in place; returns (warnings, problem lines)."""
    notes: list[str] = []
    problems: list[str] = []
    strided = isinstance(raw.get("ebft"), dict) and raw["ebft"].get("mode") == "strided"
    if strided and not _is_off(raw.get("torch_compile")) and not _is_off(raw.get("gradient_checkpointing")):
        problems.append(
            "torch_compile: cannot be combined with gradient_checkpointing in strided mode: recomputation "
            "does not reproduce the flex_attention BlockMask (CheckpointError); remove torch_compile "
            f"(got {_show(raw['torch_compile'])})"
        )
    _fsdp_compat(raw, notes, problems)
    for key in [k for k in raw if k in UNSUPPORTED_AXOLOTL_KEYS or k in IGNORED_AXOLOTL_KEYS]:
        value = raw.pop(key)
        if key in UNSUPPORTED_AXOLOTL_KEYS:
            if not _is_off(value):
                problems.append(f"{key}: {UNSUPPORTED_AXOLOTL_KEYS[key]} (got {_show(value)})")
        elif value is not None:
            notes.append(f"{key}: ignored; {IGNORED_AXOLOTL_KEYS[key]}")
    # A `trl` that is not a mapping is reported by the schema; here it only has to be skipped.
    trl = raw.get("trl")
    for key in [k for k in trl if k in UNSUPPORTED_TRL_KEYS] if isinstance(trl, dict) else []:
        value = trl.pop(key)
        # 0 is off too here (beta: 0.0 is TRL's "no KL term").
        if not _is_off(value) and not (type(value) in (int, float) and value == 0):
            problems.append(f"trl.{key}: {UNSUPPORTED_TRL_KEYS[key]} (got {_show(value)})")
    # A `datasets` that is not a list is reported by the schema; here it only has to be skipped.
    datasets = raw.get("datasets")
    for i, spec in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(spec, dict) and "train_on_split" in spec:
            split = spec.pop("train_on_split")
            if "split" in spec and spec["split"] != split:
                problems.append(
                    f"datasets.{i}.train_on_split: conflicts with split {_show(spec['split'])}; "
                    f"keep only split (got {_show(split)})"
                )
            else:
                spec["split"] = split
                notes.append(
                    f"datasets.{i}.train_on_split: read as split: {split} (axolotl's RL loader ignores this "
                    "key and loads the whole split); rename it to split"
                )
    return notes, problems


def _fsdp_compat(raw: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    """axolotl's FSDP keys -> ``fsdp_version`` and ``fsdp_config`` as the schema has them (in place)."""
    fsdp1 = raw.pop("fsdp", None)
    if not _is_off(fsdp1):
        problems.append(
            "fsdp: the FSDP1 option list is not supported; use fsdp_version: 2 with an fsdp_config mapping "
            f"(got {_show(fsdp1)})"
        )
    section = raw.get("fsdp_config")
    if not isinstance(section, dict):
        if _is_off(section):
            raw.pop("fsdp_config", None)
    else:
        # axolotl's older spelling prefixes every key with fsdp_ (fsdp_reshard_after_forward, ...).
        for key in [k for k in section if k.startswith("fsdp_") and k != "fsdp_version"]:
            value = section.pop(key)
            if key[5:] in section and section[key[5:]] != value:
                problems.append(f"fsdp_config.{key}: conflicts with fsdp_config.{key[5:]} (got {_show(value)})")
            section.setdefault(key[5:], value)
        if "fsdp_version" in section:
            inner = section.pop("fsdp_version")
            if raw.get("fsdp_version", inner) != inner:
                problems.append(f"fsdp_config.fsdp_version: conflicts with fsdp_version (got {_show(inner)})")
            raw.setdefault("fsdp_version", inner)
        for key in [k for k in section if k in FSDP_IGNORED_KEYS]:
            value = section.pop(key)
            if not _is_off(value):
                notes.append(f"fsdp_config.{key}: ignored; {FSDP_IGNORED_KEYS[key]}")
        for key in [k for k in section if k in FSDP_LIMITED_KEYS]:
            value = section.pop(key)
            accepted, why = FSDP_LIMITED_KEYS[key]
            if value is not None and value not in accepted:
                problems.append(f"fsdp_config.{key}: {why} (got {_show(value)})")
    version = raw.get("fsdp_version")
    if version is not None and version != 2 and not isinstance(version, bool):
        raw.pop("fsdp_version")
        problems.append(
            f"fsdp_version: only FSDP2 is implemented; set fsdp_version: 2 (got {_show(version)})"
            if version in (1, "1")
            else f"fsdp_version: must be 2 or null (got {_show(version)})"
        )


# ---------------------------------------------------------------------------------------------
# Error messages


def _path(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The model class whose keys live at ``loc`` (list indices step into the item type)."""
    model: type[BaseModel] = TrainConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        found = _find_model(field.annotation) if field is not None else None
        if found is None:
            return None
        model = found
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _valid_keys(container: Sequence[Any]) -> list[str]:
    model = _model_at(container)
    if model is None:
        return []
    keys = list(model.model_fields)
    if model is TrainConfig:
        keys += [*IGNORED_AXOLOTL_KEYS, *UNSUPPORTED_AXOLOTL_KEYS]
    if model is TrlSection:
        keys += list(UNSUPPORTED_TRL_KEYS)
    if model is DatasetSpec:
        keys.append("train_on_split")
    if model is FsdpSection:
        keys += [*FSDP_IGNORED_KEYS, *FSDP_LIMITED_KEYS]
    return keys


def _unknown_generation_kwarg(key: str) -> str:
    if key in _SAMPLING_KWARG_TRL_KEYS:
        return f"not a generation_kwargs key; set trl.{_SAMPLING_KWARG_TRL_KEYS[key]} instead"
    close = difflib.get_close_matches(key, list(GenerationKwargs.model_fields), n=1, cutoff=0.6)
    if close:
        return f"unknown key, did you mean {close[0]!r}?"
    return (
        "unknown key; generation_kwargs takes only stop_token_ids, the other sampling settings have trl keys "
        "of their own (temperature, top_p, top_k, min_p, repetition_penalty, max_completion_length)"
    )


def _unknown_key_reason(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key, did you mean {close[0]!r}?"
    if 0 < len(valid) <= 30:
        return "unknown key; valid keys here: " + ", ".join(valid)
    return "unknown key"


_MISSING_HINTS = {
    "rl": "required: add `rl: ebft`",
    "ebft": "the `ebft:` section is required when rl: ebft (for example `ebft: {mode: strided}`)",
    "base_model": "required: the Hub id, local directory or .gguf file of the model to fine-tune",
    "datasets": "required: a list of datasets, e.g. `datasets: [{path: my.jsonl, type: ebft_pretrain.transform}]`",
}


def _reason(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "literal_error":
        # Spelled as in YAML: true/false, not Python's True/False.
        return "must be " + re.sub(r"\b(True|False)\b", lambda m: m.group(1).lower(), ctx["expected"])
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_type", "float_parsing"):
        return "must be a number"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind == "string_type":
        return "must be a string"
    if kind == "list_type":
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping of keys to values"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length', 1)} item(s)"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"]


def _problem_lines(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = _path(loc)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            lines += [f"{_path((*loc, sub))}: {reason}" for sub, reason in cause.items]
        elif err["type"] == "extra_forbidden" and _model_at(loc[:-1]) is GenerationKwargs:
            lines.append(f"{path}: {_unknown_generation_kwarg(str(loc[-1]))}")
        elif err["type"] == "extra_forbidden":
            lines.append(f"{path}: {_unknown_key_reason(str(loc[-1]), _valid_keys(loc[:-1]))}")
        elif err["type"] == "missing" or (path == "ebft" and err["input"] is None):
            lines.append(f"{path}: {_MISSING_HINTS.get(path, 'required key is missing')}")
        elif path == "rl" and err["type"] == "literal_error":
            lines.append(f"rl: must be 'ebft', the only method this trainer implements (got {_show(err['input'])})")
        else:
            lines.append(f"{path}: {_reason(err)} (got {_show(err['input'])})")
    return lines
