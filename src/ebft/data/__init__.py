"""Data layer: load raw datasets, turn rows into token rows with a transform, pack, collate.

- ``load``: ``load_raw`` (hub id, local file or folder, split slices) and ``load_strided_datasets``
  (transform + validation + skipping + held-out split for strided mode).
- ``rows``: applying a transform with ``datasets.map`` so that one bad row never aborts the map.
- ``packing``: the paper's packing, documents joined by one EOS and cut into fixed-size chunks.
- ``transforms``: built-in transforms and ``resolve_transform`` for ``type: module.function``.
- ``collate``: right-padded ``DocumentBatch`` tensors for the trainer.
"""
