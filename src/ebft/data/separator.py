"""Which token ends a document when raw text is packed or padded for strided mode.

Base tokenizers end documents with their EOS. Instruct tokenizers make EOS the end-of-turn token
(``<|im_end|>`` in SmolLM2-Instruct and Qwen, ``<|eot_id|>`` in Llama-3-Instruct) and keep a separate
end-of-document token (``<|endoftext|>``, ``<|end_of_text|>``); joining pretraining documents with the
end-of-turn token would teach the model chat markup in plain text. So the separator is, in order:
the configured token; the EOS when it is itself an end-of-document token; the first end-of-document
token the vocabulary has; the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebft.errors import DataError

# End-of-document tokens of common tokenizer families (GPT-2/Qwen/SmolLM/Phi, Llama-3, Llama-2/Mistral, Gemma).
END_OF_DOCUMENT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


@dataclass(frozen=True)
class Separator:
    """token_id: the id placed after each document; token: its text; source: why it was chosen (for the log)."""

    token_id: int
    token: str
    source: str


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` when the vocabulary holds it as one token, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


def document_separator(tokenizer, configured: str | int | None = None, *, key: str = "document_separator") -> Separator:
    """The separator token for ``tokenizer`` (see the module docstring); ``configured`` is a token text or
    id that overrides the choice; ``key`` names where it was configured, for errors."""
    vocab_size = len(tokenizer)
    if isinstance(configured, int):
        if not 0 <= configured < vocab_size:
            raise DataError(f"{key}: {configured} is not a token id of this tokenizer (a vocabulary of {vocab_size})")
        return Separator(configured, tokenizer.convert_ids_to_tokens(configured), key)
    if configured is not None:
        token_id = _single_token_id(tokenizer, configured)
        if token_id is None:
            raise DataError(
                f"{key}: {configured!r} is not a single token of this tokenizer; use one of its special tokens, "
                f"e.g. {tokenizer.all_special_tokens[:4]}"
            )
        return Separator(token_id, configured, key)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos is not None and eos in END_OF_DOCUMENT_TOKENS:
        return Separator(eos_id, eos, "the tokenizer's eos")
    for token in END_OF_DOCUMENT_TOKENS:
        token_id = _single_token_id(tokenizer, token)
        if token_id is not None:
            why = f"not its eos {eos!r}" if eos is not None else "it has no eos"
            return Separator(token_id, token, f"the tokenizer's end-of-document token, {why}")
    if eos_id is None:
        raise DataError(
            f"the tokenizer has no eos and no end-of-document token to separate documents; set {key} "
            "or special_tokens: {eos_token: ...}"
        )
    return Separator(eos_id, eos, "the tokenizer's eos (it has no other end-of-document token)")
