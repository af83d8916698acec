"""The paper's packing: documents joined by one separator (``ebft.data.separator``) and cut into
fixed-size chunks; or, unpacked, each document ended by the separator.

All chunks hold exactly ``length`` tokens except the last, which keeps the remainder (the collator
pads it and its padding is never anchored). Documents cross chunk boundaries, as in the paper.

Memory: the joined stream is built as one int32 array per column (4 bytes per token), read from the
tokenized dataset batch by batch in Arrow form, never as Python lists.
"""

from __future__ import annotations

import numpy as np

from ebft.data.rows import ERROR, ROW


def pack_documents(dataset, length: int, separator: int, *, batch_size: int = 4096):
    """Dataset of packed chunks (columns of ``rows.token_features()``; ``ROW`` = chunk index).

    ``dataset`` holds non-empty ``input_ids``/``labels`` documents. The separator is a target in
    ``labels`` too (predicting the end of a document is part of language modelling). Any
    ``prompt_length`` is dropped: once documents are joined, there is no single prompt per row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset

    if length < 1:
        raise ValueError(f"pack length must be >= 1, got {length}")
    columns = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")
    n_tokens = sum(pc.sum(pc.list_value_length(b["input_ids"])).as_py() or 0 for b in columns.iter(batch_size))
    n_docs = len(columns)
    total = n_tokens + max(n_docs - 1, 0)  # one separator between each pair of neighbours
    streams = {name: np.empty(total, dtype=np.int32) for name in ("input_ids", "labels")}

    pos = 0
    for batch in columns.iter(batch_size):
        if batch.num_rows == 0:
            continue
        starts = None
        for name, stream in streams.items():
            docs = batch[name].combine_chunks()
            values = docs.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            if starts is None:
                doc_lengths = pc.list_value_length(docs).to_numpy(zero_copy_only=False)
                starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
                # Every document but the very first is preceded by a separator.
                starts = starts if pos > 0 else starts[1:]
            joined = np.insert(values, starts, separator)
            stream[pos : pos + len(joined)] = joined
        pos += len(joined)

    offsets = pa.array(np.append(np.arange(0, total, length), total), type=pa.int32())
    n_chunks = len(offsets) - 1
    table = pa.table(
        {name: pa.ListArray.from_arrays(offsets, pa.array(stream, type=pa.int32())) for name, stream in streams.items()}
        | {
            "prompt_length": pa.nulls(n_chunks, type=pa.int64()),
            ERROR: pa.nulls(n_chunks, type=pa.string()),
            ROW: pa.array(np.arange(n_chunks, dtype=np.int64)),
        }
    )
    return Dataset(table)


def end_documents(dataset, length: int, separator: int):
    """Each document followed by ``separator`` (a target in ``labels`` too), then cut to ``length`` tokens:
    a document that does not fit loses its separator, since it does not end there."""

    def end(batch: dict[str, list]) -> dict[str, list]:
        return {name: [(list(doc) + [separator])[:length] for doc in batch[name]] for name in ("input_ids", "labels")}

    return dataset.map(end, batched=True, desc="Ending documents")
