"""``ebft_strided_structured.transform``: prompt/completion pairs as strided documents.

Prompt from ``input``/``prompt``/``question``, completion from ``output``/``completion``/``answer``.
The prompt is tokenized with the tokenizer's special tokens (BOS where the tokenizer adds one), the
completion without, and EOS is appended to the completion so that the model learns to stop. Labels
are -100 on the prompt; ``prompt_length`` counts the prompt tokens, so anchors start inside the
completion. Rows longer than ``sequence_len`` lose the end of the completion; a prompt that leaves no
room for a single completion token makes the row unusable (it is skipped with that reason) rather
than being cut, since a cut prompt changes what the completion answers. No padding: the collator pads.
"""

from __future__ import annotations

from ebft.config import TrainConfig
from ebft.data.transforms.common import eos_id, first_present, require_tokenizer

PROMPT_FIELDS = ("input", "prompt", "question")
COMPLETION_FIELDS = ("output", "completion", "answer")


def transform(cfg: TrainConfig, **kwargs):
    sequence_len = int(cfg.sequence_len)

    def tokenize_pair(example: dict, tokenizer=None) -> dict:
        tok = require_tokenizer(tokenizer, "ebft_strided_structured.transform")
        prompt = example[first_present(example, PROMPT_FIELDS, "prompt")]
        completion = example[first_present(example, COMPLETION_FIELDS, "completion")]
        prompt_ids = tok(prompt)["input_ids"]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"] + [eos_id(tok)]
        if len(prompt_ids) >= sequence_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, which leaves no room for the completion "
                f"within sequence_len={sequence_len}"
            )
        completion_ids = completion_ids[: sequence_len - len(prompt_ids)]
        return {
            "input_ids": prompt_ids + completion_ids,
            "labels": [-100] * len(prompt_ids) + completion_ids,
            "prompt_length": len(prompt_ids),
        }

    return tokenize_pair, {"remove_columns": "__all__"}
