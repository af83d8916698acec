"""One example block per model for the quickstart's report: what the numbers mean on real text.

A held-out document is cut at one anchor, in the middle of its evaluated window; every model (base, SFT,
EBFT) then samples ``n`` continuations of ``g`` tokens from the same prefix with the evaluation's
temperature and the same seeds, so the only difference between the rows is the model.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ebft.evaluate.load import held_out_rows, load_models

CONTEXT_LINES = 8  # lines of the prefix shown (the model sees all of it)


def anchor_for(length: int, context_length: int, generate_max_len: int) -> int:
    """The anchor c: the middle of the document's window, at least the first anchor, room for g tokens.

    E.g. 128 tokens, c0 = 8, g = 8: max(8, min(64, 120)) = 64."""
    return max(context_length, min(length // 2, length - generate_max_len))


def sample_block(policy, input_ids: list[int], anchor: int, n: int, g: int, temperature: float, seed: int):
    """``n`` continuations (token id lists of at most ``g`` tokens) of ``input_ids[:anchor]``.

    Sampling is plain ancestral sampling at ``temperature`` (no top-k/top-p, as in the strided rollouts),
    seeded by ``seed`` so two models draw from the same random stream."""
    device = next(policy.parameters()).device
    prefix = torch.tensor([input_ids[:anchor]] * n, device=device)  # [n, anchor]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = policy.generate(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=g,
            min_new_tokens=g,
            pad_token_id=policy.config.eos_token_id,
        )
    return [row[anchor:].tolist() for row in out]  # n x g


def example_blocks(
    eval_cfg, checkpoints: Mapping[str, Path | None], doc_index: int, on_model: Callable[[], None] = lambda: None
) -> dict:
    """The example: the same held-out document, anchor and seeds for every model in ``checkpoints``
    (name -> checkpoint folder, None for the base model). Returns JSON-ready text. ``on_model`` is
    called after each model (a progress bar)."""

    settings = eval_cfg.ebft
    n, g, temperature = settings.n_samples_per_prompt, settings.generate_max_len, settings.temperature
    example: dict = {"samples": {}}
    for name, checkpoint in checkpoints.items():
        tokenizer, policy, _, _ = load_models(eval_cfg, checkpoint, torch.device("cpu"))
        if "context" not in example:
            rows, _ = held_out_rows(eval_cfg, tokenizer, "train")
            ids = list(rows[doc_index]["input_ids"])
            anchor = anchor_for(len(ids), settings.context_length, g)
            prefix = tokenizer.decode(ids[:anchor])
            example.update(
                document=doc_index,
                anchor=anchor,
                context="\n".join(prefix.split("\n")[-CONTEXT_LINES:]),
                real=tokenizer.decode(ids[anchor : anchor + g]),
            )
            prefix_ids = ids
        policy.eval()
        blocks = sample_block(policy, prefix_ids, example["anchor"], n, g, temperature, seed=eval_cfg.seed)
        example["samples"][name] = [tokenizer.decode(block) for block in blocks]
        del policy
        on_model()
    return example


def render_html(example: Mapping, names: Mapping[str, str]) -> str:
    """The example as an HTML section: the context's last lines, the real continuation, each model's samples."""
    if not example:
        return ""

    def code(text: str) -> str:
        return f"<pre>{html.escape(text)}</pre>"

    base = example["samples"].get("base")

    def label(name: str, samples: list[str]) -> str:
        # Same seeds: a fine-tuned model that moved too little draws exactly the base model's tokens.
        same = name != "base" and samples == base
        return html.escape(names.get(name, name)) + (" (same samples as base)" if same else "")

    rows = "".join(
        f"<tr><td>{label(name, samples)}</td><td>{''.join(code(s) for s in samples)}</td></tr>"
        for name, samples in example["samples"].items()
    )
    return f"""<h2>An example block</h2>
<p>Held-out document {example["document"]}, cut at token {example["anchor"]}: the last lines of the context
(each model sees all of it), the real next tokens, and each model's samples of the same length (same seeds).</p>
<h3>Context</h3>{code(example["context"])}
<h3>Real continuation</h3>{code(example["real"])}
<table><tr><th>model</th><th>samples</th></tr>{rows}</table>
"""
