"""Warnings that follow from a config's values (a setting that does nothing in this mode, a fallback),
and :func:`config_warnings`, which adds them to the ones found while loading the file.

Value-based (not "was the key written") so that a dumped and reloaded config warns the same.
"""

from __future__ import annotations

from ebft.choices import single_sample_fallback
from ebft.config.deploy import deploy_warnings
from ebft.config.evaluation import evaluation_warnings
from ebft.config.sections import EbftSection, TrlSection, VllmSection
from ebft.config.train import TrainConfig

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
    "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min",
)


def _value_warnings(cfg: TrainConfig) -> list[str]:
    e = cfg.ebft
    defaults = EbftSection()
    out: list[str] = []
    if e.mode == "strided":
        estimator, diversity = single_sample_fallback(e.n_samples_per_prompt, e.advantage_estimator, e.diversity_coef)
        if estimator != e.advantage_estimator:
            out.append(
                f"ebft.advantage_estimator: {e.advantage_estimator} needs n_samples_per_prompt >= 2; "
                f"with 1 sample it falls back to {estimator} (advantage = raw reward)"
            )
        if diversity != e.diversity_coef:
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
        out += _weight_transfer_warnings(cfg)
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
    out += deploy_warnings(cfg)
    out += evaluation_warnings(cfg)
    if cfg.torch_dtype == "bfloat16" and cfg.bf16 is False:
        out.append(
            "torch_dtype: bfloat16 weights with bf16: false: there is no autocast, so the model computes in "
            "bfloat16, its weights' dtype"
        )
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


def _weight_transfer_warnings(cfg: TrainConfig) -> list[str]:
    if cfg.trl.use_vllm and not cfg.trl.vllm_lora_sync:
        return []
    defaults = VllmSection()
    return [
        f"vllm.{key}: has no effect without trl.use_vllm: true and trl.vllm_lora_sync: false"
        for key in ("weight_transfer_backend", "weight_transfer_chunk_bytes", "weight_transfer_timeout")
        if getattr(cfg.vllm, key) != getattr(defaults, key)
    ]


# docs/design.md §5.4: whitened, linearly independent samples have the same diversity term.
WHITENING_NOTE = (
    "ebft.use_whitening: the whitened samples of a group are orthonormal, so ebft/diversity is 0 by construction "
    "(a sample only scores 2/(n-1) per exact copy of itself in its group) and the reward is alignment_coef x "
    "alignment; diversity_coef then only penalises duplicate samples"
)


def config_notes(cfg: TrainConfig) -> list[str]:
    """What a run logs once at its start so that its metrics read right (not a warning: nothing is wrong)."""
    groups = cfg.ebft.n_samples_per_prompt if cfg.ebft.mode == "strided" else cfg.trl.num_generations
    return [WHITENING_NOTE] if cfg.ebft.use_whitening and groups >= 2 else []


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Everything worth telling the user about ``cfg``, one ``key.path: message`` line each."""
    return [*cfg._load_warnings, *_value_warnings(cfg)]
