"""Collate token rows into one right-padded batch of documents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class DocumentBatch:
    """D documents, right-padded to the longest one (Lmax tokens).

    input_ids:     [D, Lmax] long; ``pad_token_id`` after each document's ``lengths[d]`` real tokens
    lengths:       [D] long; real (non-padding) tokens per document
    labels:        [D, Lmax] long; -100 where there is no CE target (prompt, unlabelled turns, padding)
    prompt_length: [D] long; prompt tokens per document, -1 where the row has no prompt
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    prompt_length: torch.Tensor

    def to(self, device: torch.device | str) -> DocumentBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate_documents(rows: Sequence[Mapping], pad_token_id: int) -> DocumentBatch:
    """Stack rows with ``input_ids``, ``labels`` and optional ``prompt_length`` into a DocumentBatch."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    if pad_token_id is None:
        raise ValueError("collate_documents needs a pad_token_id")
    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for d, (row, n) in enumerate(zip(rows, lengths, strict=False)):
        if len(row["labels"]) != n:
            raise ValueError(f"row {d}: {len(row['labels'])} labels for {n} input_ids")
        input_ids[d, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[d, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
    prompt_length = [row.get("prompt_length") for row in rows]
    return DocumentBatch(
        input_ids=input_ids,
        lengths=torch.tensor(lengths, dtype=torch.long),
        labels=labels,
        prompt_length=torch.tensor([-1 if p is None else int(p) for p in prompt_length], dtype=torch.long),
    )
