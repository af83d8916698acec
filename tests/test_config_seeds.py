"""ebft.config: seed-style YAML (the guide's and axolotl's examples) loads unchanged, with the values it says."""

from __future__ import annotations

from config_loading import AXOLOTL_STRIDED_FFT, AXOLOTL_STRIDED_PRETRAIN, GUIDE_STRIDED, GUIDE_STRUCTURED, write

from ebft.config import DatasetSpec, TrlSection, VllmSection, config_warnings, load_config


def test_guide_strided_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, GUIDE_STRIDED))
    e = cfg.ebft
    assert (e.mode, e.stride, e.context_length, e.generate_max_len) == ("strided", 8, 8, 8)
    assert (e.n_samples_per_prompt, e.temperature, e.top_p) == (4, 0.6, 1.0)
    assert e.feature_layers == [0.25, 0.5, 0.75]
    assert e.use_whitening is True and e.ce_coef == 0.03 and e.min_completion_prefix == 8
    assert e.advantage_estimator == "rloo" and e.embed_method == "last_token"
    assert cfg.datasets == [
        DatasetSpec(path="nvidia/OpenCodeInstruct", type="ebft_strided_structured.transform", split="train[:1%]")
    ]
    assert (cfg.sequence_len, cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (2048, 1, 2)
    assert (cfg.adapter, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_linear) == ("lora", 16, 32, True)
    assert cfg.bf16 == "auto" and cfg.gradient_checkpointing is True
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": True}
    warnings = config_warnings(cfg)  # flex_attention is axolotl's older spelling of attn_implementation
    assert warnings == ["flex_attention: read as attn_implementation: flex_attention (axolotl's older spelling)"]
    assert cfg.attn_implementation == "flex_attention"


def test_axolotl_pretrain_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, AXOLOTL_STRIDED_PRETRAIN))
    assert cfg.datasets[0].split == "train[:100]"  # axolotl's train_on_split, read as split
    assert cfg.datasets[0].type == "ebft_pretrain.transform" and cfg.datasets[0].pack is None
    assert cfg.special_tokens == {"pad_token": "<|end_of_text|>"}
    assert cfg.learning_rate == 1e-6 and cfg.optimizer == "adamw_torch_fused" and cfg.warmup_steps == 2
    assert (cfg.max_steps, cfg.num_epochs, cfg.save_steps, cfg.logging_steps) == (5, 1.0, 100, 1)
    assert cfg.lora_dropout == 0.05 and cfg.wandb_project == "ebft" and cfg.val_set_size == 0.0
    assert cfg.output_dir == "./outputs/ebft-strided-validation"
    warnings = config_warnings(cfg)  # flash_attention: false asks for what happens anyway: no warning
    assert [w.split(":")[0] for w in warnings] == ["datasets.0.train_on_split"]
    assert "read as split: train[:100]" in warnings[0] and cfg.attn_implementation is None


def test_axolotl_full_parameter_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, AXOLOTL_STRIDED_FFT))
    assert cfg.adapter is None and cfg.weight_decay == 0.01 and cfg.wandb_name == "llama8b-strided-fft"
    assert cfg.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert cfg.ebft.diversity_coef == 0.0 and cfg.ebft.use_whitening is True
    # One warning per ignored key that has a value; fp16/load_in_8bit: false and wandb_watch: (null)
    # agree with what ebft does, so they pass silently.
    # torch_dtype is honoured (bf16 trained weights), so it is no longer an ignored key.
    assert sorted(w.split(":")[0] for w in config_warnings(cfg)) == ["ddp", "device_map"]
    assert cfg.torch_dtype == "bfloat16"


def test_guide_structured_config_resolves(tmp_path):
    cfg = load_config(write(tmp_path, GUIDE_STRUCTURED))
    assert cfg.ebft.mode == "structured"
    assert cfg.trl == TrlSection(
        num_generations=4, max_completion_length=256, use_vllm=True, vllm_lora_sync=True, vllm_server_port=8000
    )
    assert cfg.vllm == VllmSection(gpu_memory_utilization=0.5)
    assert cfg.learning_rate == 5e-6 and cfg.max_steps == 20
    assert [w.split(":")[0] for w in config_warnings(cfg)] == ["flash_attention"]
