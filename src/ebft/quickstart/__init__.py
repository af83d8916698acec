"""``ebft quickstart``: the offline demo, EBFT against SFT on this machine's own Python sources.

Modules: ``run`` (the phases, their sizes and configs) -> ``corpus`` (standard-library files, train /
held-out split) -> ``scratch`` (a BPE tokenizer and a small Llama built from scratch, also the tests'
tiny models) -> ``sft`` (the cross-entropy baseline and pretraining) -> ``report`` (verdicts, HTML)
and ``plot`` (metrics.jsonl -> PNGs, also ``ebft plot``).
"""
