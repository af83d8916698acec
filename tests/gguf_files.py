"""Write small GGUF files from a Hugging Face Llama and its byte-level BPE tokenizer, for the GGUF tests.

The layout is llama.cpp's: tensors under GGUF names, the query and key projections with their rows
reordered per head (llama.cpp's rotary convention, which transformers undoes on load), and the tokenizer
as a ``gpt2`` (byte-level BPE) vocabulary with its merges.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# llama.cpp token types: a normal token, and a control token (special: never split, never merged).
NORMAL, CONTROL = 1, 3


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF rotary halves -> llama.cpp interleaved pairs: within each head, row r of the first half and
    row r of the second half become neighbours (2r, 2r + 1)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(
    model,
    tokenizer,
    path: str | Path,
    *,
    architecture: str = "llama",
    skip: Iterable[str] = (),
) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``) and ``tokenizer`` as an unquantized (F32) GGUF file.

    Tied models get no ``output.weight`` (that absence is how GGUF says "tied"). ``architecture`` is the
    name written to the header (the tensors stay Llama's); ``skip`` leaves out the named HF tensors.
    """
    import gguf

    cfg = model.config
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(writer, tokenizer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    skipped = set(skip)
    for name, tensor in model.state_dict().items():
        if name in skipped or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _rotary_rows(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _rotary_rows(data, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special
    }
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in special else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
