"""The schema of the config's sections: ``ebft:``, ``datasets:`` items, ``trl:`` (with its
``generation_kwargs``), ``fsdp_config:`` and ``vllm:``. Each field has its default, constraint and
description; checks that involve more than one section live on :class:`~ebft.config.train.TrainConfig`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, PlainValidator, field_validator, model_validator

from ebft.choices import AdvantageEstimator, FeatureNorm, LossType, PoolMethod, RewardScaling, WhiteningSpace
from ebft.config.base import Problems, Section

_DOTTED_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _str_or_str_list(value: Any) -> str | list[str]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")


# One error message instead of one per union member (which is what a plain `str | list[str]` gives).
StrOrStrList = Annotated[str | list[str], PlainValidator(_str_or_str_list, json_schema_input_type=str | list[str])]
_Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class EbftSection(Section):
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
    embed_method: PoolMethod = Field(
        "last_token",
        description="How token features are pooled into one vector per sequence or block: last valid token, "
        "mean over valid tokens, mean over completion tokens, or the tokens at 25/50/75% concatenated.",
    )
    feature_norm: FeatureNorm = Field(
        "per_layer",
        description="L2 normalisation of the hidden states: each layer before concatenation (per_layer), "
        "the concatenation (joint), or none.",
    )
    use_whitening: bool = Field(
        False,
        description="Whiten the pooled features of each group of samples (SVD) before the reward. Needs a "
        "group: strided mode with n_samples_per_prompt: 1 and whitening is refused (one sample whitened "
        "against itself has alignment +-2 whatever it says).",
    )
    whitening_space: WhiteningSpace = Field(
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
    advantage_estimator: AdvantageEstimator = Field(
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
        description="Device of the frozen feature network ('cpu', 'cuda', 'cuda:N', 'mps'); null = the next "
        "visible GPU when one process sees two or more, else the policy's device. On another device than the "
        "policy it is a frozen copy (with LoRA too).",
    )
    log_rollouts: bool = Field(False, description="Write sampled rollouts to a JSON-lines file in output_dir.")
    feature_network: Literal["base", "warm_start"] = Field(
        "base",
        description="With lora_model_dir: which frozen network embeds rollouts and ground truth. base (default): "
        "the base model without any adapter, as in the paper's code for its warm-start runs (policy = the SFT "
        "model, critic = the base model); it shares the policy's weights under disable_adapter, so it costs no "
        "memory. warm_start: the warm-started model (base + the lora_model_dir adapter as loaded), frozen, as in "
        "the paper's text (a feature network initialised from the generator); a frozen copy of the layers up to "
        "the deepest feature layer. Without lora_model_dir both are the base model.",
    )

    @field_validator("feature_device")
    @classmethod
    def _device_name(cls, value: str | None) -> str | None:
        if value is not None and not _DEVICE.match(value):
            raise ValueError("must be 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return value

    @model_validator(mode="after")
    def _something_to_train(self) -> EbftSection:
        if self.rl_coef == 0 and self.ce_coef == 0:
            raise Problems([("rl_coef", "rl_coef and ce_coef are both 0, so the loss is always 0")])
        return self

    @model_validator(mode="after")
    def _whitening_needs_a_group(self) -> EbftSection:
        if self.mode == "strided" and self.use_whitening and self.n_samples_per_prompt == 1:
            raise Problems(
                [
                    (
                        "use_whitening",
                        "needs n_samples_per_prompt >= 2: one sample whitened against itself has alignment +-2 "
                        "whatever it says, so the reward carries no information; set use_whitening: false or "
                        "raise n_samples_per_prompt (got n_samples_per_prompt: 1)",
                    )
                ]
            )
        return self


class DatasetSpec(Section):
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
    data_files: StrOrStrList | None = Field(None, description="File(s) inside `path` to load, as for datasets.")
    name: str | None = Field(None, description="Dataset configuration name (the `name` of load_dataset).")
    field: str | None = Field(
        None,
        description="ebft_pretrain.transform: the text column; default the first of text/content/question that exists.",
    )
    pack: bool | None = Field(
        None,
        description="ebft_pretrain.transform only: true (default) packs documents into sequence_len chunks "
        "with the document_separator token between them; false pads each document on its own.",
    )
    document_separator: str | None = Field(
        None,
        min_length=1,
        description="ebft_pretrain.transform only: the token that ends each document (between packed documents, "
        "after each one with pack: false), e.g. '<|endoftext|>'; null = the tokenizer's end-of-document token "
        "(<|endoftext|>, <|end_of_text|>, </s> or <eos>; not an instruct tokenizer's end-of-turn eos) when it "
        "has one, else its eos. The token used is logged.",
    )

    @field_validator("type")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and not _DOTTED_NAME.match(value):
            raise ValueError("must be a 'module.function' name, e.g. 'ebft_pretrain.transform'")
        return value

    @model_validator(mode="after")
    def _pack_only_for_pretrain(self) -> DatasetSpec:
        pretrain = self.type is not None and self.type.startswith("ebft_pretrain.")
        if self.pack is not None and not pretrain:
            raise Problems([("pack", f"only ebft_pretrain.transform packs documents (type is {self.type!r})")])
        if self.document_separator is not None and not pretrain:
            raise Problems(
                [("document_separator", f"only ebft_pretrain.transform separates documents (type is {self.type!r})")]
            )
        return self


_Port = Annotated[int, Field(ge=1, le=65535)]


class GenerationKwargs(Section):
    """``trl.generation_kwargs``: extra sampling settings; only stop tokens, the rest are trl keys."""

    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        description="Token ids that end a completion, in addition to the tokenizer's EOS "
        "(e.g. [151645, 151643] for Qwen's <|im_end|> and <|endoftext|>); null = EOS only. Each must be an id "
        "of the tokenizer (checked when it loads).",
    )


class TrlSection(Section):
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
        description="Sync the policy to the vLLM server by saving the LoRA adapter and hot-loading it (needs "
        "adapter: lora); false = send the full (LoRA-merged) weights with vLLM's weight transfer.",
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
        description="Importance weights are clamped to [1/cap, cap] (> 1); read only when "
        "vllm_importance_sampling_clip_max is null.",
    )
    vllm_importance_sampling_clip_max: float | None = Field(
        None,
        gt=0.0,
        description="Upper bound of the importance weights (> 0; TRL's newer name for vllm_importance_sampling_cap); "
        "null = vllm_importance_sampling_cap.",
    )
    vllm_importance_sampling_clip_min: float | None = Field(
        None,
        ge=0.0,
        description="Lower bound of the importance weights (>= 0, below the upper bound; 0 = no lower bound); "
        "null = 1 / the upper bound (TRL's null means no lower bound).",
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
    scale_rewards: RewardScaling = Field(
        "group",
        description="Divide advantages by the reward std of each prompt's group ('group', or true), of the "
        "whole batch ('batch'), or not at all ('none', or false).",
    )
    loss_type: LossType = Field(
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

    @property
    def importance_weight_bounds(self) -> tuple[float, float]:
        """(low, high) that importance weights are clamped to: the clip keys, else [1/cap, cap]."""
        high = self.vllm_importance_sampling_cap
        if self.vllm_importance_sampling_clip_max is not None:
            high = self.vllm_importance_sampling_clip_max
        low = 1.0 / high if self.vllm_importance_sampling_clip_min is None else self.vllm_importance_sampling_clip_min
        return low, high

    @model_validator(mode="after")
    def _importance_bounds_agree(self) -> TrlSection:
        cap, clip_max = self.vllm_importance_sampling_cap, self.vllm_importance_sampling_clip_max
        # cap's default says nothing, so only a cap the file changed can disagree with clip_max.
        default_cap = type(self).model_fields["vllm_importance_sampling_cap"].default
        if clip_max is not None and cap not in (default_cap, clip_max):
            raise Problems(
                [
                    (
                        "vllm_importance_sampling_cap",
                        "conflicts with vllm_importance_sampling_clip_max, the newer name of the same upper "
                        f"bound ({clip_max}); keep only clip_max (got {cap})",
                    )
                ]
            )
        low, high = self.importance_weight_bounds
        if low >= high:
            key = "vllm_importance_sampling_clip_min"
            if self.vllm_importance_sampling_clip_min is None:
                key = "vllm_importance_sampling_clip_max"
            raise Problems([(key, f"the importance-weight bounds must have low < high (got [{low:g}, {high:g}])")])
        return self

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


class FsdpSection(Section):
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


class VllmSection(Section):
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
    data_parallel_size: int = Field(1, ge=1, description="Model replicas the server runs (>= 1).")
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse the KV cache of shared prompt prefixes; null = vLLM's default (on)."
    )
    # Full-weight sync (trl.use_vllm with vllm_lora_sync: false): vLLM's weight-transfer protocol.
    weight_transfer_backend: Literal["nccl", "gloo"] = Field(
        "nccl",
        description="How full weights reach the server: nccl (vLLM's weight-transfer backend; trainer and "
        "server on CUDA GPUs) or gloo (CPU; spoken only by ebft's test server, not by vLLM).",
    )
    weight_transfer_chunk_bytes: int = Field(
        1 << 30,
        ge=1,
        description="Most bytes of weights sent per /update_weights request (>= 1; a larger single tensor "
        "goes alone); also the most extra trainer memory a sync holds.",
    )
    weight_transfer_timeout: float = Field(
        300.0,
        gt=0.0,
        description="Seconds to wait for the server to join the weight-transfer group, and for each tensor "
        "of a transfer (> 0).",
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        # axolotl's vllm: schema writes "unset" as null (tensor_parallel_size: null = vLLM's default).
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if v is not None}
        return value
