"""``ebft_pretrain.transform``: raw text documents for strided mode (no prompt, every token a target).

Column: the dataset entry's ``field``, else the first of ``text``, ``content``, ``question``.

- ``pack`` unset or true (default): the paper's packing. Each document is tokenized without special
  tokens; the loader joins all documents with one separator token between neighbours and cuts the
  stream into chunks of exactly ``sequence_len`` tokens (the last chunk keeps the remainder and is shorter).
- ``pack: false``: one row per document, its tokens followed by the separator, cut to ``sequence_len``
  (a cut document loses its separator, since it does not end there).

The separator is the entry's ``document_separator``, else the tokenizer's end-of-document token
(``ebft.data.separator``: ``<|endoftext|>`` rather than an instruct tokenizer's end-of-turn EOS); the
loader adds it and logs which token it used.

``labels`` equal ``input_ids``; there is no ``prompt_length``, so anchors start at ``context_length``.
"""

from __future__ import annotations

from ebft.config import TrainConfig
from ebft.data.transforms.common import first_present, require_tokenizer

TEXT_FIELDS = ("text", "content", "question")


def transform(cfg: TrainConfig, **kwargs):
    spec = kwargs.get("dataset")
    field = getattr(spec, "field", None)
    pack = getattr(spec, "pack", None) is not False
    sequence_len = int(cfg.sequence_len)

    def tokenize_documents(batch: dict[str, list], tokenizer=None) -> dict[str, list]:
        tok = require_tokenizer(tokenizer, "ebft_pretrain.transform")
        column = field if field is not None else first_present(batch, TEXT_FIELDS, "text")
        if column not in batch:
            raise ValueError(f"no column '{column}' (field); the dataset has {sorted(batch)}")
        texts = batch[column]
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"column '{column}' holds {type(text).__name__}, expected text")
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "labels": [list(doc) for doc in ids]}

    options = {"remove_columns": "__all__", "batched": True}
    options["pack_length" if pack else "end_length"] = sequence_len
    return tokenize_documents, options
