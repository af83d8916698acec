"""Tiny hybrid and recurrent causal LMs built locally (random weights, non-unit norm weights), shared by the
``test_hybrid_*`` files: the structured-mode architecture matrix (docs/design.md §7.2).

Every family runs its slow torch path on CPU (no mamba-ssm / causal-conv1d kernels): small hidden sizes,
2-4 layers, state sizes and chunk sizes of a few units, so that one structured step of each takes seconds.
"""

from __future__ import annotations

import torch
from test_architectures import ARCHITECTURES, COMMON

VOCAB = 61
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
ATTENTION = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
MAMBA2 = {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 8}
GATED_DELTANET = {
    "head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}

# family -> (transformers config class, its arguments). The README's structured-mode table names these.
HYBRID = {
    # Three Gated DeltaNet layers, then one full-attention layer (Qwen3.5's 3:1 pattern).
    "qwen3_5_text": (
        "Qwen3_5TextConfig",
        {
            **ATTENTION,
            **GATED_DELTANET,
            "intermediate_size": 48,
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        },
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        {
            **ATTENTION,
            **GATED_DELTANET,
            "intermediate_size": 48,
            "num_hidden_layers": 4,
            "layer_types": ["linear_attention"] * 3 + ["full_attention"],
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
        },
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        {
            **ATTENTION,
            **MAMBA2,
            "intermediate_size": 48,
            "num_hidden_layers": 4,
            "layer_types": ["mamba", "attention", "mamba", "attention"],
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "shared_intermediate_size": 32,
            "embedding_multiplier": 2.0,
            "attention_multiplier": 0.3,
            "residual_multiplier": 0.5,
            "logits_scaling": 2.0,
        },
    ),
    # Short-convolution layers and attention layers.
    "lfm2": (
        "Lfm2Config",
        {
            **ATTENTION,
            "intermediate_size": 48,
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
            "block_auto_adjust_ff_dim": False,
            "tie_word_embeddings": False,
        },
    ),
    # Attention and a Mamba-2 mixer in parallel in every layer.
    "falcon_h1": (
        "FalconH1Config",
        {
            **ATTENTION,
            **MAMBA2,
            "intermediate_size": 48,
            "num_hidden_layers": 3,
            "mamba_d_ssm": 64,
            "head_dim": 8,
            "lm_head_multiplier": 0.5,
            "embedding_multiplier": 2.0,
        },
    ),
    "jamba": (
        "JambaConfig",
        {
            **ATTENTION,
            "intermediate_size": 48,
            "num_hidden_layers": 4,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "mamba_d_state": 8,
            "mamba_dt_rank": 4,
        },
    ),
    "bamba": (
        "BambaConfig",
        {**ATTENTION, **MAMBA2, "intermediate_size": 48, "num_hidden_layers": 4, "attn_layer_indices": [1, 3]},
    ),
    "nemotron_h": (
        "NemotronHConfig",
        {
            **ATTENTION,
            "head_dim": 8,
            "intermediate_size": 48,
            "layers_block_type": ["mamba", "attention", "mamba", "mlp"],
            "mamba_num_heads": 4,
            "mamba_head_dim": 16,
            "ssm_state_size": 8,
            "n_groups": 1,
            "chunk_size": 8,
        },
    ),
    "mamba": (
        "MambaConfig",
        {"hidden_size": 32, "num_hidden_layers": 3, "state_size": 8, "time_step_rank": 4, "tie_word_embeddings": False},
    ),
    "mamba2": (
        "Mamba2Config",
        {
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_heads": 4,
            "head_dim": 16,
            "state_size": 8,
            "n_groups": 1,
            "chunk_size": 8,
        },
    ),  # fmt: skip
    # Two recurrent (RG-LRU) blocks, then a local-attention block.
    "recurrent_gemma": (
        "RecurrentGemmaConfig",
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "lru_width": 32,
            "attention_window_size": 16,
            "logits_soft_cap": 3.0,
        },
    ),
}


# An attention model strided mode refuses (attention sinks) and structured mode runs padded.
STRIDED_REFUSED = {
    "gpt_oss": (
        "GptOssConfig",
        {
            **ATTENTION,
            "head_dim": 8,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "sliding_window": 4,
        },
    ),  # fmt: skip
}
# The attention families of the strided-mode oracle (tests/test_architectures.py), same configs.
ATTENTION_FAMILIES = list(ARCHITECTURES)
# Every family of the structured-mode matrix; README "Supported architectures" lists their model types.
FAMILIES = list(HYBRID) + list(STRIDED_REFUSED) + ATTENTION_FAMILIES
# MambaModel's output_hidden_states tuple has no embedding output: its entry k is the output of layer k.
NO_EMBEDDING_STATE = ("mamba",)


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every normalisation weight made non-unit (and non-zero for Gemma's 1 + w norms): random init leaves
    them all equal, which hides whether a hidden state was taken before or after a norm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.rsplit(".", 2)[-2].lower():
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def family_config(name: str, *, vocab_size: int = VOCAB, special: dict | None = None):
    """The tiny config of family ``name`` (a hybrid one, or an attention one of the strided oracle)."""
    import transformers

    if name in HYBRID or name in STRIDED_REFUSED:
        cls, extra = {**HYBRID, **STRIDED_REFUSED}[name]
        return getattr(transformers, cls)(vocab_size=vocab_size, **(special or SPECIAL), **extra)
    cls, extra = ARCHITECTURES[name]
    return getattr(transformers, cls)(**{**COMMON, "vocab_size": vocab_size, **(special or SPECIAL)}, **extra)


def build_family(name: str, *, vocab_size: int = VOCAB, special: dict | None = None, seed: int = 0, head_scale=4.0):
    """The tiny model of family ``name``: eval mode, fp32, norms perturbed, the LM head scaled by
    ``head_scale`` (a peakier policy than the near-uniform random init, so that stop tokens get drawn)."""
    import transformers

    config = family_config(name, vocab_size=vocab_size, special=special)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return perturb_norms(model, seed).float().eval()


def hidden_states(model, ids: list[int]) -> list[torch.Tensor]:
    """The model's hidden states of one unpadded sequence from its own ``output_hidden_states``, indexed as
    ebft's feature layers are: 0 the embedding output, k the output of layer k - 1, num_layers the final
    (post-norm) state. Each [T, H] float64."""
    x = torch.tensor([ids])
    with torch.no_grad():
        states = list(model(x, output_hidden_states=True).hidden_states)
        if model.config.model_type in NO_EMBEDDING_STATE:
            # [out_1, ..., out_N, norm(out_N)] -> [embeddings, out_1, ..., out_{N-1}, norm(out_N)]
            states = [model.get_input_embeddings()(x)] + states[:-2] + states[-1:]
    assert len(states) == model.config.num_hidden_layers + 1
    return [h[0].double() for h in states]


# Qwen3.5's vocabulary size and the ids of its special tokens, as the example configs name them
# (trl.generation_kwargs.stop_token_ids [248044, 248046], special_tokens.pad_token <|endoftext|>).
QWEN35_VOCAB = 248320
QWEN35_SPECIAL = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046}
# Qwen3's chat template in short: ChatML turns, and an empty thinking block opening the reply when
# enable_thinking is false.
QWEN35_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def qwen35_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on ``texts``, laid out like Qwen3.5's: 248320 ids, the special tokens
    at Qwen3.5's own ids (the ids in between are placeholders that no text encodes to), ChatML template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in QWEN35_SPECIAL.items()}
    for i in range(len(vocab), QWEN35_VOCAB):
        vocab[by_id.get(i, f"<|placeholder_{i}|>")] = i
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for t, i in QWEN35_SPECIAL.items()
    ]  # fmt: skip
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = QWEN35_CHAT_TEMPLATE
    assert len(fast) == QWEN35_VOCAB and fast.convert_tokens_to_ids("<|im_end|>") == 248046
    return fast


def save_qwen35(out, tokenizer, *, multimodal: bool = True):
    """A tiny Qwen3.5 checkpoint in ``out``: the multimodal ``qwen3_5`` wrapper with a one-block vision tower, as
    the hub checkpoints are (``multimodal=False``: the text-only ``qwen3_5_text``), and ``tokenizer``."""
    import transformers

    _, text = HYBRID["qwen3_5_text"]
    special = {"pad_token_id": 248044, "bos_token_id": None, "eos_token_id": 248046}
    text = {**text, **special, "vocab_size": QWEN35_VOCAB, "tie_word_embeddings": False}
    if multimodal:
        vision = {
            **{"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32},
            **{"patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 1, "num_position_embeddings": 16},
        }
        config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
        cls = transformers.Qwen3_5ForConditionalGeneration
    else:
        config = transformers.Qwen3_5TextConfig(**text)
        cls = transformers.Qwen3_5ForCausalLM
    torch.manual_seed(0)
    model = perturb_norms(cls(config))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_family(name: str, out, tokenizer_dir):
    """The family's tiny model over the tokenizer in ``tokenizer_dir`` (its vocabulary and special ids), saved
    with that tokenizer in ``out``: a local checkpoint for ``ebft.cli.main``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    build_family(name, vocab_size=len(tok), special=special).save_pretrained(out)
    tok.save_pretrained(out)
    return out
