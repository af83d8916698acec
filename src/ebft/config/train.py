"""The whole config, :class:`TrainConfig`: flat training keys plus the sections, and every check that
involves more than one key (run before any model loads); the vLLM addresses that follow from it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from ebft.config.base import Problems, Section, unknown_key_reason
from ebft.config.deploy import deploy_problems
from ebft.config.evaluation import evaluation_problems, metric_name
from ebft.config.sections import DatasetSpec, EbftSection, FsdpSection, StrOrStrList, TrlSection, VllmSection
from ebft.config.structured import structured_problems
from ebft.modeling.chat_templates import choice_problem

# Dataset transforms shipped with the EBFT docs, by the mode whose rows they produce. A transform
# of the other mode cannot work, so the pairing is checked before any data loads.
_STRIDED_TRANSFORM_MODULES = ("ebft_pretrain", "ebft_strided_structured", "ebft_strided_chat")
_STRIDED_TRANSFORMS = ("ebft_reasoning.transform_strided",)
_STRUCTURED_TRANSFORM_MODULES = ("ebft_opencode", "ebft_chat_multiturn", "ebft_reasoning")

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")

_BIND_ALL_HOSTS = ("0.0.0.0", "::")


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


class TrainConfig(Section):
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

    chat_template: str | None = Field(
        None,
        description="Chat template set on the tokenizer before any data is read, and saved with it: a named "
        "format (chatml, qwen_25, qwen3, llama3, llama3_2_vision, gemma, phi_3, mistral_v1, mistral_v2v3, "
        "mistral_v3_tekken, mistral_v7_tekken), tokenizer_default (the tokenizer's own; an error if it has "
        "none), tokenizer_default_fallback_<name> (its own, else <name>) or jinja (chat_template_jinja); "
        "null = the tokenizer's own, or chat_template_jinja when that is set.",
    )
    chat_template_jinja: str | None = Field(
        None,
        min_length=1,
        description="With chat_template: jinja (or null): the Jinja chat template itself, or the path of a "
        "file holding it.",
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
    test_datasets: list[DatasetSpec] | None = Field(
        None,
        min_length=1,
        description="Held-out datasets, read and transformed like `datasets` (each at its `split`), for evaluation "
        "during training and `ebft evaluate`; instead of val_set_size (set one of them, not both).",
    )
    sequence_len: int = Field(2048, ge=1, description="Maximum tokens per document (>= 1).")
    dataset_prepared_path: str | None = Field(
        None,
        min_length=1,
        description="Folder caching the prepared rows (transformed, tokenised, checked, split) under a hash of "
        "everything that changes them; the next run with the same inputs reads them back. `ebft preprocess CFG` "
        "fills it. null = prepare the rows in memory at every start.",
    )

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
    adapter: Literal["lora", "qlora"] | None = Field(
        None,
        description="'lora' trains a LoRA adapter; 'qlora' the same over a 4-bit base (load_in_4bit: true); "
        "null = all weights.",
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank (>= 1).")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (>= 1); the scale is alpha / r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1).")
    lora_target_modules: StrOrStrList | None = Field(
        None, description="Modules to adapt: a list of module names, or one regular expression (as in PEFT)."
    )
    lora_target_linear: bool | None = Field(None, description="Adapt every linear layer except the output head.")
    lora_model_dir: str | None = Field(
        None,
        min_length=1,
        description="Warm start: a trained PEFT LoRA adapter (folder or hub id) that training continues. Its "
        "adapter_config.json fixes the rank, alpha and target modules: lora_r and lora_alpha must equal them, and "
        "lora_target_modules / lora_target_linear, if set, must select the same modules; lora_dropout applies.",
    )
    merge_lora: bool = Field(
        False,
        description="After training, merge the adapter into the (unquantised) base weights and save a plain "
        "transformers model with its tokenizer in output_dir/merged (also `ebft merge-lora OUTPUT_DIR`).",
    )
    load_in_8bit: bool = Field(
        False, description="Load the frozen base weights in 8 bits (bitsandbytes; needs adapter: lora)."
    )
    load_in_4bit: bool = Field(
        False,
        description="Load the frozen base weights in 4 bits, NF4 with double quantisation (bitsandbytes; needs "
        "adapter: qlora or lora). The LoRA adapters stay in full precision.",
    )

    # Precision and memory
    bf16: Literal[True, False, "auto"] = Field(
        "auto",
        description="bfloat16 training: true, false (fp32) or auto (bf16 where the device supports it).",
    )
    torch_dtype: Literal["bfloat16", "float32", "float16"] | None = Field(
        None,
        description="dtype the policy's weights are stored in. bfloat16 without an adapter trains bf16 weights: "
        "gradients and AdamW moments are bf16 too (no float32 master copy; half the memory, updates rounded to "
        "bf16); with LoRA it is the frozen base's dtype (adapters stay float32). float32: fp32 weights. null: "
        "float32 for full fine-tuning, bf16 for a LoRA base when bf16 is on. float16 is refused (no loss scaling).",
    )
    attn_implementation: (
        Literal["eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "xformers", "sage", "fp8"]
        | None
    ) = Field(
        None,
        description="Attention backend of the model's own passes (sampling with transformers, padded passes, "
        "evaluation): eager, sdpa, flex_attention, flash_attention_2 or flash_attention_3 (xformers, sage and fp8 "
        "run as sdpa). Where the backend cannot run here (flash-attn not installed, no CUDA GPU, flex_attention "
        "on CPU) the closest exact one, sdpa, is used with one warning. ebft's packed strided and prefix-sharing "
        "passes always use their own exact attention. null = transformers' default (sdpa, or eager for a model "
        "without an SDPA path).",
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
        None,
        ge=1,
        description="Write checkpoint-N every this many optimizer steps (>= 1), the last step included when it "
        "falls on one; null = no checkpoints (the final model is always saved in output_dir).",
    )
    save_final_checkpoint: bool = Field(
        False,
        description="Also write checkpoint-N at the last step when it does not fall on save_steps, so that the "
        "run can be extended later with a larger max_steps and resume_from_checkpoint.",
    )
    save_total_limit: int | None = Field(
        None, ge=1, description="Keep at most this many checkpoint-N folders (the newest); null = keep all."
    )
    resume_from_checkpoint: str | None = Field(
        None,
        min_length=1,
        description="Continue a run from a checkpoint folder, or `latest` for the newest one in output_dir. "
        "With a larger max_steps (or num_epochs) the run is extended: the learning-rate schedule is the one "
        "of the new length, continued from the checkpoint's step.",
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

    # Evaluation during training (the metrics of `ebft evaluate`, logged as eval/*)
    eval_steps: int | float | None = Field(
        None,
        gt=0,
        description="Evaluate the policy on the held-out rows (val_set_size or test_datasets) every this many "
        "optimizer steps (a whole number), or every this fraction of the run's steps (in (0, 1), rounded up), "
        "and at the last step; not with evals_per_epoch. null = no evaluation during training (unless "
        "evals_per_epoch or eval_strategy asks for it).",
    )
    evals_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Evaluate this many times per epoch: every total_steps / (evals_per_epoch x num_epochs) steps, "
        "rounded up (as axolotl computes it), and at the last step; not with eval_steps.",
    )
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        None,
        description="no: no evaluation during training; epoch: once per epoch (evals_per_epoch: 1); steps (needs "
        "eval_steps or evals_per_epoch) or null: as eval_steps or evals_per_epoch say.",
    )
    eval_on_start: bool | None = Field(
        None,
        description="Also evaluate before the first step (logged at step 0; a fresh run only; not a candidate for "
        "early stopping or the best model). null = true whenever evaluation during training is on, as in axolotl.",
    )
    eval_max_docs: int | None = Field(
        200,
        ge=1,
        description="Evaluate at most this many held-out documents (structured: prompt rows), spread evenly over "
        "them, the same ones every time; null = all. 200 is also the bound of `ebft evaluate` on a sample of "
        "training rows.",
    )
    eval_batch_size: int | None = Field(
        None,
        ge=1,
        description="Documents (structured: completions) per evaluation batch, during training and in `ebft "
        "evaluate`; null = micro_batch_size.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when metric_for_best_model has not improved on its best for this many evaluations in a "
        "row (the run then ends as at its last step: checkpoint, final model, run card); null = never.",
    )
    metric_for_best_model: str | None = Field(
        None,
        min_length=1,
        description="The evaluation metric early stopping and load_best_model_at_end compare, e.g. eval/cfm_loss "
        "(transformers' eval_cfm_loss and cfm_loss mean the same), eval/ce_loss, eval/reward; null = "
        "eval/cfm_loss.",
    )
    greater_is_better: bool | None = Field(
        None,
        description="Whether a higher metric_for_best_model is better; null = from the metric (losses, "
        "perplexities and diversity lower, alignment and reward higher).",
    )
    load_best_model_at_end: bool = Field(
        False,
        description="Hand over (final model, run card, merge, upload) the weights of the evaluated checkpoint, or "
        "of the last step, with the best metric_for_best_model instead of the last step's; save_total_limit "
        "keeps that checkpoint. Needs save_steps, a multiple of the evaluation interval (as in transformers).",
    )

    # Hugging Face Hub
    hub_model_id: str | None = Field(
        None,
        description="Upload the final model (or adapter), tokenizer and run card to this Hub repo ('name' or "
        "'namespace/name'); the token (HF_TOKEN or `hf auth login`) is checked before training starts.",
    )
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = Field(
        "every_save",
        description="When to upload: end (only the final model); every_save (also the weights of every checkpoint); "
        "checkpoint (also the latest whole checkpoint as last-checkpoint/, to resume from); all_checkpoints "
        "(every whole checkpoint in its own checkpoint-N/ folder).",
    )
    hub_private_repo: bool | None = Field(
        None, description="Create the Hub repo private (true) or public (false); null = the Hub's default."
    )
    hub_revision: str | None = Field(
        None, min_length=1, description="Branch of the Hub repo to upload to (created if missing); null = main."
    )
    push_to_hub: bool | None = Field(
        None, description="false: never upload, even with hub_model_id; null or true: upload when hub_model_id is set."
    )

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

    @field_validator("load_in_8bit", "load_in_4bit", "merge_lora", "load_best_model_at_end", mode="before")
    @classmethod
    def _null_is_off(cls, value: Any) -> Any:
        # axolotl files often leave these keys empty (`load_in_8bit:`), which means off.
        return False if value is None else value

    @field_validator("metric_for_best_model")
    @classmethod
    def _logged_metric_name(cls, value: str | None) -> str | None:
        # transformers' spellings (eval_cfm_loss, cfm_loss) name the metric logged as eval/cfm_loss.
        return None if value is None else metric_name(value)

    @field_validator("special_tokens")
    @classmethod
    def _known_special_tokens(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        problems = [
            (name, unknown_key_reason(name, _SPECIAL_TOKEN_NAMES))
            for name in (value or {})
            if name not in _SPECIAL_TOKEN_NAMES
        ]
        problems += [(name, "must be a non-empty string") for name, tok in (value or {}).items() if tok == ""]
        if problems:
            raise Problems(problems)
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        problems: list[tuple[str, str]] = []
        if self.fsdp_version == 2 and self.fsdp_config is None:
            self.fsdp_config = FsdpSection()
        if self.fsdp_config is not None and self.fsdp_version != 2:
            problems.append(("fsdp_config", "needs fsdp_version: 2 (ebft implements FSDP2 only)"))
        if self.fsdp_version == 2 and self.ebft.mode == "structured" and self.trl.use_vllm and self.trl.vllm_lora_sync:
            problems.append(
                (
                    "fsdp_version",
                    "cannot be combined with trl.vllm_lora_sync: the adapter is saved from unsharded weights; "
                    "set vllm_lora_sync: false (the gathered weights go through vLLM's weight transfer)",
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
        if self.torch_dtype == "float16":
            problems.append(
                (
                    "torch_dtype",
                    "float16 weights need loss scaling (a grad scaler), which ebft does not implement, and AdamW's "
                    "epsilon underflows in float16; use bfloat16, or leave torch_dtype unset for float32 master "
                    "weights",
                )
            )
        template_problem = choice_problem(self.chat_template, self.chat_template_jinja)
        if template_problem is not None:
            key = "chat_template_jinja" if template_problem.startswith("chat_template_jinja") else "chat_template"
            problems.append((key, template_problem))
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append(("warmup_steps", "set warmup_steps or warmup_ratio, not both"))
        if self.val_set_size >= 1 and self.val_set_size != int(self.val_set_size):
            problems.append(
                (
                    "val_set_size",
                    f"from 1 up it counts rows, so it must be a whole number (got {self.val_set_size})",
                )
            )
        targets_from_adapter = self.lora_model_dir is not None
        if self.adapter and not (self.lora_target_linear or self.lora_target_modules or targets_from_adapter):
            problems.append(("adapter", "set lora_target_linear: true or lora_target_modules"))
        problems += deploy_problems(self)
        problems += evaluation_problems(self)
        if e.mode == "structured":
            problems += structured_problems(self)
        entries = [(f"datasets.{i}", spec) for i, spec in enumerate(self.datasets)]
        entries += [(f"test_datasets.{i}", spec) for i, spec in enumerate(self.test_datasets or [])]
        for where, spec in entries:
            made_for = _transform_mode(spec.type)
            if made_for is not None and made_for != e.mode:
                problems.append(
                    (
                        f"{where}.type",
                        (
                            f"{spec.type!r} produces {made_for}-mode rows but ebft.mode is {e.mode!r}; "
                            f"set ebft.mode: {made_for} or use a {e.mode}-mode transform"
                        ),
                    )
                )
        if problems:
            raise Problems(problems)
        return self


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
