"""Axolotl compatibility: every axolotl / TRL key that ebft recognises but does not use, or cannot honour,
in tables a reader can scan, and the pass that strips them from a raw config before the schema sees it.

Nothing is rewritten silently: an ignored key gives one warning, an unsupported key is accepted only
when off, and a renamed key (``datasets[].train_on_split``, ``fsdp_config.fsdp_*``) is read with a
warning or refused when it conflicts with the new spelling.
"""

from __future__ import annotations

from typing import Any

from ebft.config.base import show

# axolotl's older boolean attention flags -> the attn_implementation each one means.
LEGACY_ATTENTION_FLAGS: dict[str, str] = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "flex_attention": "flex_attention",
    "eager_attention": "eager",
    "xformers_attention": "xformers",
    "sage_attention": "sage",
}

# Axolotl keys that an axolotl config may carry but that change nothing here: key -> why / what
# ebft does instead. Each one present (and not null) gives one warning.
IGNORED_AXOLOTL_KEYS: dict[str, str] = {
    "torch_compile": "ebft does not torch.compile the model (flex_attention compiles its own kernels on CUDA), "
    "so it also combines with gradient_checkpointing",
    "tf32": "ebft leaves torch's TF32 matmul setting at its default",
    "model_type": "the model is always loaded with AutoModelForCausalLM",
    "tokenizer_type": "the tokenizer is always loaded with AutoTokenizer",
    "strict": "ebft always rejects unknown keys",
    "dataset_processes": "dataset transforms run in the training process",
    "pad_to_sequence_len": "micro-batches are padded to their longest document, not to sequence_len",
    "sample_packing": "packing is chosen per dataset with `datasets[].pack` (ebft_pretrain.transform)",
    "eval_sample_packing": "packing is chosen per dataset with `datasets[].pack` (ebft_pretrain.transform)",
    "train_on_inputs": "the dataset transform decides which tokens are CE targets (prompts never are)",
    "group_by_length": "ebft does not reorder the data by length",
    "remove_unused_columns": "each transform names the columns it removes (`remove_columns`)",
    "eval_table_size": "evaluation during training logs its metrics (eval/*), not a table of samples; "
    "`ebft evaluate` writes every row's values to its JSON",
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
    "gptq": "GPTQ-quantised base models are not supported",
    "deepspeed": "DeepSpeed is not supported; run multi-GPU with `accelerate launch -m ebft train ...`",
    "activation_offloading": "activation offloading is not implemented (and axolotl rejects it with flex_attention)",
    "auto_resume_from_checkpoints": "use `resume_from_checkpoint: latest`",
}


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
    "rollout_func": "rollouts are ebft's own (single- or multi-turn sampling from the policy); no custom function",
    "vllm_guided_decoding_regex": "guided decoding is not supported: completions are sampled from the policy "
    "unconstrained (the policy gradient needs the policy's own distribution)",
    "generation_batch_size": "each rollout batch is one optimizer step's prompts (micro_batch_size * "
    "gradient_accumulation_steps / num_generations per process); reuse a batch with num_iterations",
    "off_policy_mask_threshold": "off-policy sequence masking is not implemented; stale rollouts are "
    "importance-weighted instead (vllm_importance_sampling_correction)",
    "replay_buffer_size": "the replay buffer of axolotl's data producer is not implemented",
}

# axolotl's EBFT strategy never hands its entropy keys to TRL (only its GRPO strategy does).
_NO_ENTROPY_BONUS = (
    "axolotl's EBFT trainers do not pass the entropy settings to TRL, so they add no entropy bonus, and "
    "neither does ebft (its policy loss has no entropy term)"
)

# trl: keys of axolotl's schema that change nothing here: key -> what happens instead. A value that
# is not null gives one warning.
IGNORED_TRL_KEYS: dict[str, str] = {
    "entropy_coef": _NO_ENTROPY_BONUS,
    "use_adaptive_entropy": _NO_ENTROPY_BONUS,
    "entropy_target": _NO_ENTROPY_BONUS,
    "entropy_coef_delta": _NO_ENTROPY_BONUS,
    "entropy_coef_min": _NO_ENTROPY_BONUS,
    "entropy_coef_max": _NO_ENTROPY_BONUS,
    "log_multimodal": "ebft trains text-only models, so completions are logged as text only",
    "ref_model_mixup_alpha": "there is no reference model (EBFT has no KL penalty)",
    "use_bias_correction_kl": "there is no KL term to correct (EBFT has no KL penalty)",
    "multi_objective_aggregation": "there is one reward (feature matching), so both aggregations are the same",
    "streaming_min_groups": "each rollout batch is scored once it is complete (no streaming)",
    "reward_num_workers": "the feature-matching reward runs on the training device, not in worker processes",
    "replay_recompute_logps": "there is no replay buffer",
    "reroll_max_groups": "zero-signal prompts are not re-rolled",
}

# trl: keys whose axolotl values ebft implements only in part: key -> (values accepted, why).
# null is always accepted (axolotl's default).
LIMITED_TRL_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "importance_sampling_level": (
        ("token",),
        "the clipped surrogate and its ratios are per token (GRPO); sequence-level ratios (GSPO) are not implemented",
    ),
    "vllm_importance_sampling_mode": (
        ("token_truncate",),
        "importance weights are per token and clamped to their bounds (token_truncate; "
        "vllm_importance_sampling_clip_min/_max, default [1/cap, cap]); masking modes are not implemented",
    ),
    "prefetch_depth": ((1,), "async_prefetch generates exactly one rollout batch ahead"),
    "reroll_start_fraction": ((1.0,), "zero-signal prompts are never re-rolled (1.0 disables re-rolling)"),
}

# vllm: keys of axolotl's schema that only choose how axolotl starts its own server: key -> what
# happens instead. A value that is not null gives one warning.
_OWN_SERVER = "`ebft vllm-serve CFG` starts vLLM's own OpenAI-compatible server"
IGNORED_VLLM_KEYS: dict[str, str] = {
    "serve_module": f"{_OWN_SERVER} (LoRA hot-loading, or weight transfer), not this module",
    "worker_extension_cls": f"{_OWN_SERVER}; weights reach it through vLLM's built-in weight-transfer routes, "
    "no worker extension is loaded",
    "device": "choose the server's GPU with CUDA_VISIBLE_DEVICES when starting `ebft vllm-serve`",
    "enable_reasoning": "ebft samples token ids from /v1/completions; a reasoning parser changes nothing there",
    "reasoning_parser": "ebft samples token ids from /v1/completions; a reasoning parser changes nothing there",
}

# Sampling settings people put in generation_kwargs (vLLM's SamplingParams names) -> the trl key
# that holds them here, so each setting has exactly one place.
SAMPLING_KWARG_TRL_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_tokens": "max_completion_length",
    "max_new_tokens": "max_completion_length",
    "max_completion_length": "max_completion_length",
}


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


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == "" or value == {} or value == []


def axolotl_compat(raw: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Strip axolotl-only keys from ``raw`` in place; returns (warnings, problem lines)."""
    notes: list[str] = []
    problems: list[str] = []
    _fsdp_compat(raw, notes, problems)
    _attention_compat(raw, notes, problems)
    _report_to_compat(raw, notes, problems)
    for key in [k for k in raw if k in UNSUPPORTED_AXOLOTL_KEYS or k in IGNORED_AXOLOTL_KEYS]:
        value = raw.pop(key)
        if key in UNSUPPORTED_AXOLOTL_KEYS:
            if not _is_off(value):
                problems.append(f"{key}: {UNSUPPORTED_AXOLOTL_KEYS[key]} (got {show(value)})")
        elif value is not None:
            notes.append(f"{key}: ignored; {IGNORED_AXOLOTL_KEYS[key]}")
    # A `trl` that is not a mapping is reported by the schema; here it only has to be skipped.
    trl = raw.get("trl")
    trl_block: dict[str, Any] = trl if isinstance(trl, dict) else {}
    for key in [k for k in trl_block if k in UNSUPPORTED_TRL_KEYS]:
        value = trl_block.pop(key)
        # 0 is off too here (beta: 0.0 is TRL's "no KL term").
        if not _is_off(value) and not (type(value) in (int, float) and value == 0):
            problems.append(f"trl.{key}: {UNSUPPORTED_TRL_KEYS[key]} (got {show(value)})")
    _server_block_compat(raw, notes, problems)
    # A `datasets` that is not a list is reported by the schema; here it only has to be skipped.
    datasets = raw.get("datasets")
    for i, spec in enumerate(datasets if isinstance(datasets, list) else []):
        if isinstance(spec, dict) and "train_on_split" in spec:
            split = spec.pop("train_on_split")
            if "split" in spec and spec["split"] != split:
                problems.append(
                    f"datasets.{i}.train_on_split: conflicts with split {show(spec['split'])}; "
                    f"keep only split (got {show(split)})"
                )
            else:
                spec["split"] = split
                notes.append(
                    f"datasets.{i}.train_on_split: read as split: {split} (axolotl's RL loader ignores this "
                    "key and loads the whole split); rename it to split"
                )
    return notes, problems


def _attention_compat(raw: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    """axolotl's boolean attention flags -> ``attn_implementation`` (in place); a flag set to false is dropped."""
    for key in [k for k in raw if k in LEGACY_ATTENTION_FLAGS]:
        value = raw.pop(key)
        if _is_off(value):
            continue
        wanted = LEGACY_ATTENTION_FLAGS[key]
        if value is not True:
            problems.append(f"{key}: must be true or false (got {show(value)})")
        elif raw.get("attn_implementation", wanted) != wanted:
            problems.append(
                f"{key}: true means attn_implementation: {wanted}, which conflicts with attn_implementation: "
                f"{raw['attn_implementation']}; keep only attn_implementation"
            )
        else:
            raw["attn_implementation"] = wanted
            notes.append(f"{key}: read as attn_implementation: {wanted} (axolotl's older spelling)")


REPORT_TO = ("wandb", "tensorboard", "none")


def _report_to_compat(raw: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    """transformers' ``report_to`` -> ``use_tensorboard`` / ``wandb_project`` (in place)."""
    if "report_to" not in raw:
        return
    value = raw.pop("report_to")
    targets = [value] if isinstance(value, str) else value
    if value is None or not targets or targets == ["none"]:
        return
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        problems.append(f"report_to: must be a tracker name or a list of them: wandb, tensorboard (got {show(value)})")
        return
    for target in [t for t in targets if t not in REPORT_TO]:
        problems.append(
            f"report_to: ebft reports to wandb and tensorboard (and always to output_dir/metrics.jsonl), "
            f"not {target!r}; list only wandb and/or tensorboard"
        )
    if "tensorboard" in targets:
        if raw.get("use_tensorboard") is False:
            problems.append("report_to: tensorboard conflicts with use_tensorboard: false; keep one of them")
        else:
            raw["use_tensorboard"] = True
            notes.append("report_to: tensorboard read as use_tensorboard: true (events in output_dir/tensorboard)")
    if "wandb" in targets and raw.get("wandb_project") is None:
        problems.append("report_to: wandb needs the project to log to; set wandb_project: NAME")


def _server_block_compat(raw: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    """axolotl's other ``trl:`` and ``vllm:`` keys: ignored with a warning, or accepted only for the values
    ebft implements (in place)."""
    trl, vllm = raw.get("trl"), raw.get("vllm")
    # A block that is not a mapping is reported by the schema; here it only has to be skipped.
    trl_block: dict[str, Any] = trl if isinstance(trl, dict) else {}
    vllm_block: dict[str, Any] = vllm if isinstance(vllm, dict) else {}
    for key in [k for k in trl_block if k in IGNORED_TRL_KEYS or k in LIMITED_TRL_KEYS]:
        value = trl_block.pop(key)
        if key in IGNORED_TRL_KEYS and value is not None:
            notes.append(f"trl.{key}: ignored; {IGNORED_TRL_KEYS[key]}")
        elif key in LIMITED_TRL_KEYS and value is not None and value not in LIMITED_TRL_KEYS[key][0]:
            problems.append(f"trl.{key}: {LIMITED_TRL_KEYS[key][1]} (got {show(value)})")
    for key in [k for k in vllm_block if k in IGNORED_VLLM_KEYS]:
        if vllm_block.pop(key) is not None:
            notes.append(f"vllm.{key}: ignored; {IGNORED_VLLM_KEYS[key]}")


def _fsdp_compat(raw: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    """axolotl's FSDP keys -> ``fsdp_version`` and ``fsdp_config`` as the schema has them (in place)."""
    fsdp1 = raw.pop("fsdp", None)
    if not _is_off(fsdp1):
        problems.append(
            "fsdp: the FSDP1 option list is not supported; use fsdp_version: 2 with an fsdp_config mapping "
            f"(got {show(fsdp1)})"
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
                problems.append(f"fsdp_config.{key}: conflicts with fsdp_config.{key[5:]} (got {show(value)})")
            section.setdefault(key[5:], value)
        if "fsdp_version" in section:
            inner = section.pop("fsdp_version")
            if raw.get("fsdp_version", inner) != inner:
                problems.append(f"fsdp_config.fsdp_version: conflicts with fsdp_version (got {show(inner)})")
            raw.setdefault("fsdp_version", inner)
        for key in [k for k in section if k in FSDP_IGNORED_KEYS]:
            value = section.pop(key)
            if not _is_off(value):
                notes.append(f"fsdp_config.{key}: ignored; {FSDP_IGNORED_KEYS[key]}")
        for key in [k for k in section if k in FSDP_LIMITED_KEYS]:
            value = section.pop(key)
            accepted, why = FSDP_LIMITED_KEYS[key]
            if value is not None and value not in accepted:
                problems.append(f"fsdp_config.{key}: {why} (got {show(value)})")
    version = raw.get("fsdp_version")
    if version is not None and version != 2 and not isinstance(version, bool):
        raw.pop("fsdp_version")
        problems.append(
            f"fsdp_version: only FSDP2 is implemented; set fsdp_version: 2 (got {show(version)})"
            if version in (1, "1")
            else f"fsdp_version: must be 2 or null (got {show(version)})"
        )
