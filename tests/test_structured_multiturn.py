"""Multi-turn structured rollouts through a fake backend that records every call (docs/design.md §10):
each sample keeps its own conversation, nothing is generated past sequence_len, masks, and the loss
scores the sampled ids in their own contexts.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from structured_builders import (
    SEQ_LEN,
    FakeBackend,
    assistant_message,
    encode,
    load_model,
    make_row,
    structured_settings,
    teacher_forced_logp,
    user_message,
)

from ebft.structured.rollout import Completion, loss_token_count
from ebft.structured.step import policy_logprobs, roll_out


def _chat_text(messages, generation_prompt=False):
    """The tiny model's chat template written out: ``<|role|>\\ncontent</s>\\n`` per message."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)
    return text + ("<|assistant|>\n" if generation_prompt else "")


def _multi_turn_rows(tok):
    return [
        # three assistant turns
        make_row(
            tok,
            [user_message("alpha one")],
            "gt a1",
            [
                user_message("alpha two"),
                assistant_message("gt a2"),
                user_message("alpha three is longer"),
                assistant_message("gt a3"),
            ],
        ),
        # a system message, two assistant turns, and a trailing user message nobody answers
        make_row(
            tok,
            [{"role": "system", "content": "be brief"}, user_message("bravo one")],
            "gt b1",
            [user_message("bravo two"), assistant_message("gt b2"), user_message("bravo left hanging")],
        ),
        # single-turn row in the same batch
        make_row(tok, [user_message("charlie")], "gt c1"),
    ]


def _expected_conversation(row, tag, j):
    """Messages of sample j of a row: its own user turns, and its own replies in place of the ground truth."""
    turn = 0
    out = [*row.prompt, assistant_message(f"re {tag} s{j} t0")]
    for m in row.remaining_turns:
        if m["role"] == "assistant":
            turn += 1
            out.append(assistant_message(f"re {tag} s{j} t{turn}"))
        else:
            out.append(dict(m))
    return out


def _expected_tokens(tok, row, conversation):
    """ids and loss mask of a conversation: True exactly on the tokens of the assistant replies after the prompt."""
    text, spans = "", []
    for k, m in enumerate(conversation):
        header = f"<|{m['role']}|>\n"
        if k >= len(row.prompt) and m["role"] == "assistant":
            spans.append((len(text) + len(header), len(text) + len(header) + len(m["content"])))
        text += header + m["content"] + "</s>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [e > s and any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return text, enc["input_ids"], mask


def test_multi_turn_samples_keep_their_own_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    G = 2
    s = structured_settings(tok, num_generations=G)
    rows = _multi_turn_rows(tok)
    tags = ["alpha", "bravo", "charlie"]
    seeds = [11, 22, 33]
    backend = FakeBackend(tok)
    samples = roll_out(backend, rows, s, tok, seeds)
    assert len(samples) == len(rows) * G

    for p, (row, tag) in enumerate(zip(rows, tags, strict=True)):
        for j in range(G):
            q = samples[p * G + j]
            if not row.remaining_turns:  # single-turn: prompt + reply + EOS, loss on reply and EOS
                reply = encode(tok, f"re {tag} s{j} t0") + [tok.eos_token_id]
                assert q.sequence == list(row.prompt_ids) + reply
                assert q.loss_mask == [False] * len(row.prompt_ids) + [True] * len(reply)
                assert q.feature_length == len(q.sequence) - 1
                continue
            conversation = _expected_conversation(row, tag, j)
            text, ids, mask = _expected_tokens(tok, row, conversation)
            assert tok.decode(q.sequence, skip_special_tokens=False) == text
            assert q.sequence == ids
            assert q.loss_mask == mask
            replies = [m["content"] for m in conversation[len(row.prompt) :] if m["role"] == "assistant"]
            assert tok.decode([t for t, m in zip(q.sequence, q.loss_mask, strict=True) if m]) == "".join(replies)
            assert q.prompt_length == len(row.prompt_ids)
            assert q.sequence[: q.prompt_length] == list(row.prompt_ids)
            assert q.feature_length == len(q.sequence) and q.finished

    # The backend saw: one first-turn call for all rows, then one call per later round, each context the
    # sample's own conversation up to the turn it answers.
    first, *later = backend.calls
    assert first["prompts"] == [list(r.prompt_ids) for r in rows] and first["n"] == G and first["seeds"] == seeds
    assert [c["n"] for c in later] == [1, 1]
    # Round 1: samples of alpha (turn 1) and bravo (turn 1); round 2: alpha's samples only (turn 2).
    contexts = [tok.decode(ids, skip_special_tokens=False) for c in later for ids in c["prompts"]]
    expected = []
    for turn, waiting in ((1, [0, 1]), (2, [0])):
        for p in waiting:
            for j in range(G):
                conversation = _expected_conversation(rows[p], tags[p], j)
                # everything before the turn-th reply of this sample, then the generation prompt
                upto = [k for k, m in enumerate(conversation) if m["role"] == "assistant"][turn]
                expected.append(_chat_text(conversation[:upto], generation_prompt=True))
    assert contexts == expected

    # Seeds: one per (prompt, sample, turn), all distinct, none equal to a first-turn seed.
    later_seeds = [seed for c in later for seed in c["seeds"]]
    assert len(set(later_seeds)) == len(later_seeds) == 6
    assert not set(later_seeds) & set(seeds)

    # A row's rollouts depend on its own seed only: bravo alone (same seed) gets the same contexts,
    # seeds and samples as inside the batch.
    alone = FakeBackend(tok)
    solo = roll_out(alone, [rows[1]], s, tok, [22])
    assert solo == samples[G : 2 * G]
    assert alone.calls[1]["seeds"] == later[0]["seeds"][G : 2 * G]
    assert alone.calls[1]["prompts"] == later[0]["prompts"][G : 2 * G]


def test_multi_turn_generates_nothing_past_sequence_len(tiny_tokenizer):
    """A sample is cut at sequence_len; a later turn must not ask for tokens beyond it (they would be thrown
    away, and a vLLM server with max_model_len = sequence_len rejects such a request)."""
    tok = tiny_tokenizer
    seq_len = 64
    s = structured_settings(tok, num_generations=2, sequence_len=seq_len, max_completion_length=16)
    rows = [
        # the second user turn alone is ~60 tokens: the reply after it has no room at all
        make_row(
            tok,
            [user_message("alpha go")],
            "gt",
            [
                user_message("alpha " + "self " * 60),
                assistant_message("x"),
                user_message("more"),
                assistant_message("y"),
            ],
        ),
        # the second context (about 30 tokens) leaves room for fewer than 16 new tokens
        make_row(
            tok, [user_message("bravo go")], "gt", [user_message("bravo " + "self " * 18), assistant_message("x")]
        ),
        # fits: untouched
        make_row(tok, [user_message("charlie go")], "gt", [user_message("charlie two"), assistant_message("y")]),
    ]
    backend = FakeBackend(tok)
    samples = roll_out(backend, rows, s, tok, [1, 2, 3])
    for call in backend.calls:
        for prompt, cap in zip(call["prompts"], call["max_tokens"], strict=True):
            assert len(prompt) + cap <= seq_len
    assert all(len(q.sequence) <= seq_len for q in samples)
    # alpha's second reply would start past the end: nothing is generated for it, and the sample is truncated
    alpha = [tok.decode(p, skip_special_tokens=False) for c in backend.calls[1:] for p in c["prompts"]]
    assert not any(text.startswith("<|user|>\nalpha") for text in alpha)
    assert [q.finished for q in samples[:2]] == [False, False]
    # bravo's reply is capped at the room left ("re bravo s0 t1" + EOS fits in it, so it still finishes)
    bravo_caps = [
        cap
        for c in backend.calls[1:]
        for p, cap in zip(c["prompts"], c["max_tokens"], strict=True)
        if tok.decode(p).startswith("<|user|>\nbravo")
    ]
    assert len(bravo_caps) == 2 and all(cap < 16 for cap in bravo_caps)
    # charlie fits: the same as with an unlimited sequence_len
    wide = roll_out(FakeBackend(tok), rows[2:], replace(s, sequence_len=SEQ_LEN), tok, [3])
    assert samples[4:] == wide and all(q.finished for q in wide)


@pytest.mark.parametrize("reply", ["s", "assistant", "\n", "|>", "a plain reply"])
def test_multi_turn_mask_of_a_reply_that_also_occurs_in_the_markup(tiny_tokenizer, reply):
    """A later reply is looked for after its own header: "s" must not match the "s" of the previous
    message's "</s>", nor "assistant" the header's special token, nor "\n" the newline after "</s>"."""
    from ebft.structured.chat import conversation_tokens

    tok = tiny_tokenizer
    row = make_row(tok, [user_message("hi there")], "gt")
    conversation = [
        *row.prompt,
        assistant_message("first answer"),
        user_message("more please"),
        assistant_message(reply),
    ]
    tokens = conversation_tokens(tok, conversation, 1, [True, False, True])
    text, ids, mask = _expected_tokens(tok, row, conversation)
    assert tokens.ids == ids
    assert tokens.generated_mask == mask
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "first answer" + reply


def test_multi_turn_truncated_turn_masks_the_whole_conversation(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = _multi_turn_rows(tok)[:2]
    # Sample 1 of alpha runs out of tokens at its second reply; everything else finishes.
    backend = FakeBackend(tok, unfinished={("alpha", 1, 1)})
    masked = roll_out(
        backend, rows, structured_settings(tok, num_generations=2, mask_truncated_completions=True), tok, [1, 2]
    )
    assert [q.finished for q in masked] == [True, False, True, True]
    assert not any(masked[1].loss_mask)
    assert all(any(q.loss_mask) for i, q in enumerate(masked) if i != 1)
    kept = roll_out(
        FakeBackend(tok, unfinished={("alpha", 1, 1)}), rows, structured_settings(tok, num_generations=2), tok, [1, 2]
    )
    assert kept[1].loss_mask == _expected_tokens(tok, rows[0], _expected_conversation(rows[0], "alpha", 1))[2]


class _ByteReplies:
    """Replies spelled one byte-level token per character ("re" as "r", "e", ...): decoding and
    re-encoding merges them, so the re-rendered conversation holds other tokens than the sampled ones.
    Reports sampler log-probs (-0.5 per token). Records the contexts it was given."""

    def __init__(self, tok):
        self.tok, self.contexts = tok, []

    def generate(self, prompts, n, max_tokens, seeds):
        out = []
        for prompt, cap in zip(prompts, max_tokens, strict=True):
            self.contexts.append(list(prompt))
            chars = [self.tok.convert_tokens_to_ids(ch) for ch in f"reply{len(self.contexts)}"]
            ids = tuple([*chars, self.tok.eos_token_id][:cap])
            out.append([Completion(ids, finished=len(ids) == len(chars) + 1, logprobs=(-0.5,) * len(ids))] * n)
        return out


def test_multi_turn_loss_scores_the_sampled_ids_in_their_own_contexts(tiny_model_dir, tiny_tokenizer):
    """The policy gradient must score exactly what was sampled where it was sampled: each reply's ids
    after the context it was generated from, not the re-rendered, re-tokenised conversation."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=1)
    row = _multi_turn_rows(tok)[1]  # two assistant turns
    backend = _ByteReplies(tok)
    (sample,) = roll_out(backend, [row], s, tok, [5])
    replies = [tuple(tok.convert_tokens_to_ids(ch) for ch in f"reply{k}") + (tok.eos_token_id,) for k in (1, 2)]
    # The sampled ids are not what re-encoding the text gives (the test is only meaningful if so).
    assert encode(tok, "reply1") != list(replies[0][:-1])
    assert sample.turns == tuple(zip((tuple(c) for c in backend.contexts), replies, strict=True))
    assert sample.behaviour_logprobs == [-0.5] * sum(len(r) for r in replies)
    assert loss_token_count(sample) == sum(len(r) for r in replies)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        logp, seq = policy_logprobs(model, [sample], s, tok.pad_token_id)
        want = torch.cat([teacher_forced_logp(model, list(ctx) + list(r))[len(ctx) - 1 :] for ctx, r in sample.turns])
    assert (seq == 0).all()
    torch.testing.assert_close(logp, want, atol=1e-5, rtol=1e-5)
