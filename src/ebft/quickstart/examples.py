"""The example block of the quickstart's report: what the numbers mean on real text, where the models differ.

Every model (base, SFT, EBFT) rolls out one held-out document exactly as the evaluation does: ``n`` samples
of ``g`` tokens at every block, from the same seeded random stream. With the same draws, two models pick
the same token unless their next-token probabilities differ enough to move a draw from one token to
another, so identical samples mean the models barely differ there. The block shown is the one where the
fine-tuned models' samples differ most (ties broken by the total-variation distance between their
first-token distributions); the report states how often they differ on the document, and when they never
do, by how little their distributions differ.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ebft.data.collate import collate_documents
from ebft.evaluate.load import held_out_rows, load_models
from ebft.modeling.parts import backbone_of, output_head
from ebft.strided.step import StridedSettings, document_generators, roll_out

CONTEXT_LINES = 8  # lines of the prefix shown (the model sees all of it)


def differing_samples(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: ``[n, K, g]`` sampled tokens of two models -> ``[K]`` samples whose g tokens differ."""
    return (a != b).any(-1).sum(0)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p, q: ``[K, V]`` distributions -> ``[K]`` total-variation distances, 1/2 sum |p - q|."""
    return 0.5 * (p - q).abs().sum(-1)


def choose_block(differ: torch.Tensor, tv: torch.Tensor, valid: torch.Tensor) -> int:
    """The valid block with the most differing samples, ties broken by the larger total variation.

    E.g. differ [1, 3, 3], tv [0.9, 0.1, 0.2], all valid -> 2."""
    score = differ.double() + tv.double().clamp(0, 1) * 0.5  # tv < 1 never outweighs one more sample
    return int(torch.where(valid, score, -1.0).argmax())


@torch.no_grad()
def first_token_probs(policy, input_ids: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """input_ids ``[1, L]``, anchors ``[K]`` -> ``[K, V]``: the sampling distribution of each block's first token
    (the logits at position anchor - 1, divided by the temperature)."""
    hidden = backbone_of(policy)(input_ids=input_ids, use_cache=False).last_hidden_state[0]  # [L, H]
    logits = output_head(policy)(hidden[anchors - 1]).float()
    return (logits / temperature).softmax(-1)


def example_blocks(
    eval_cfg, checkpoints: Mapping[str, Path | None], doc_index: int, on_model: Callable[[], None] = lambda: None
) -> dict:
    """The example from held-out document ``doc_index`` for every model in ``checkpoints`` (name -> folder,
    None for the base model; base first, then the fine-tuned models). Returns JSON-ready text and counts.
    ``on_model`` is called after each model (a progress bar)."""
    settings = StridedSettings.from_config(eval_cfg.ebft)
    device = torch.device("cpu")
    drawn: dict[str, torch.Tensor] = {}
    probs: dict[str, torch.Tensor] = {}
    batch = layout = tokenizer = None
    for name, checkpoint in checkpoints.items():
        tokenizer, policy, _, _ = load_models(eval_cfg, checkpoint, device)
        if batch is None:
            rows, _ = held_out_rows(eval_cfg, tokenizer, "train")
            batch = collate_documents([rows[doc_index]], tokenizer.pad_token_id)
        policy.eval()
        generators = document_generators(eval_cfg.seed, 0, doc_index, 1, device)
        rollout = roll_out(policy, batch, settings, generators=generators)
        layout = rollout.layout
        drawn[name] = rollout.tokens[0]  # [n, K, g]
        probs[name] = first_token_probs(policy, batch.input_ids, layout.anchors[0], settings.logprob_temperature)
        del policy
        on_model()
    if batch is None or layout is None or tokenizer is None:
        raise ValueError("no checkpoints to compare")
    valid = layout.valid[0]
    tuned = [name for name in drawn if name != "base"]
    # The pair compared: the two fine-tuned models when there are two, else the one against the base model.
    pair = (tuned[-1], tuned[0]) if len(tuned) > 1 else (tuned[0], "base")
    differ = differing_samples(drawn[pair[0]], drawn[pair[1]])
    tv = total_variation(probs[pair[0]], probs[pair[1]])
    k = choose_block(differ, tv, valid)
    anchor = int(layout.anchors[0, k])
    ids = batch.input_ids[0, : int(batch.lengths[0])].tolist()
    prefix = tokenizer.decode(ids[:anchor])

    def compare(a: str, b: str) -> dict:
        d, t = differing_samples(drawn[a], drawn[b]), total_variation(probs[a], probs[b])
        return {
            "samples_differing": int(d[k]),
            "blocks_differing": int(((d > 0) & valid).sum()),
            "total_variation": float(t[k]),
            "max_total_variation": float(t[valid].max()),
        }

    comparisons = {f"{name} vs base": compare(name, "base") for name in tuned}
    if len(tuned) > 1:
        comparisons[f"{pair[0]} vs {pair[1]}"] = compare(*pair)
    return {
        "document": doc_index,
        "anchor": anchor,
        "block": k,
        "blocks": int(valid.sum()),
        "n": layout.n,
        "context": "\n".join(prefix.split("\n")[-CONTEXT_LINES:]),
        "real": tokenizer.decode(ids[anchor : anchor + layout.g]),
        "samples": {name: [tokenizer.decode(drawn[name][i, k].tolist()) for i in range(layout.n)] for name in drawn},
        "comparisons": comparisons,
    }


def comparison_sentences(example: Mapping, names: Mapping[str, str]) -> list[str]:
    """How the models' samples differ on this document, in words."""
    out = []
    blocks, n = example["blocks"], example["n"]
    for key, c in example["comparisons"].items():
        a, _, b = key.partition(" vs ")
        who = f"{names.get(a, a)} and {names.get(b, b)}"
        if c["blocks_differing"] == 0:
            out.append(
                f"{who} drew the same tokens in every sample of all {blocks} blocks of this document: with the same "
                "random draws, two models pick the same token unless their next-token probabilities differ enough "
                f"to move a draw to another token, and theirs differ by at most {c['max_total_variation']:.3f} "
                "(total variation of the first token's distribution, over the blocks)."
            )
        else:
            out.append(
                f"{who}: different samples in {c['blocks_differing']} of {blocks} blocks; in the block shown, "
                f"{c['samples_differing']} of {n} samples differ (total variation of the first token's "
                f"distribution {c['total_variation']:.3f}; at most {c['max_total_variation']:.3f} over the blocks)."
            )
    return out


def render_html(example: Mapping, names: Mapping[str, str]) -> str:
    """The example as an HTML section: the context's last lines, the real continuation, each model's samples,
    and how much the models' samples differ."""
    if not example:
        return ""

    def code(text: str) -> str:
        return f"<pre>{html.escape(text)}</pre>"

    base = example["samples"].get("base")

    def label(name: str, samples: list[str]) -> str:
        same = name != "base" and samples == base
        return html.escape(names.get(name, name)) + (" (same samples as base)" if same else "")

    rows = "".join(
        f"<tr><td>{label(name, samples)}</td><td>{''.join(code(s) for s in samples)}</td></tr>"
        for name, samples in example["samples"].items()
    )
    notes = "".join(f"<li>{html.escape(s)}</li>" for s in comparison_sentences(example, names))
    return f"""<h2>An example block</h2>
<p>Held-out document {example["document"]}, block {example["block"] + 1} of {example["blocks"]} (cut at token
{example["anchor"]}), the block where the fine-tuned models' samples differ most: the last lines of the context
(each model sees all of it), the real next tokens, and each model's {example["n"]} samples, drawn as in the
evaluation with the same random stream for every model.</p>
<h3>Context</h3>{code(example["context"])}
<h3>Real continuation</h3>{code(example["real"])}
<table><tr><th>model</th><th>samples</th></tr>{rows}</table>
<ul>{notes}</ul>
"""
