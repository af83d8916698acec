"""Multi-turn CE trains the end of every assistant turn, as single-turn CE trains its EOS.

The tiny tokenizer's chat template renders ``<|role|>\\ncontent</s>\\n`` per message and its EOS is ``</s>``,
so the token the policy must produce to end a reply is the ``</s>`` right after the reply's content.
"""

from __future__ import annotations

from structured_builders import structured_settings

from ebft.data.structured import prompt_row
from ebft.structured.chat import conversation_tokens
from ebft.structured.rollout import Sampling
from ebft.structured.settings import StructuredSettings
from ebft.structured.step import ce_sequences

SEQ_LEN = 256


def _settings(tok, stop_ids) -> StructuredSettings:
    return structured_settings(
        tok,
        num_generations=2,
        sampling=Sampling(temperature=1.0, stop_token_ids=tuple(stop_ids)),
        ce_coef=0.1,
        sequence_len=SEQ_LEN,
    )


def _row(tok, prompt, ground_truth, remaining=()):
    return prompt_row(
        {"prompt": prompt, "ground_truth": ground_truth, "remaining_turns": list(remaining)},
        tok,
        sequence_len=SEQ_LEN,
        max_completion_length=64,
        chat_template_kwargs=None,
        source="test",
    )


def _expected(tok, conversation, prompt_count, trailer):
    """ids and CE mask written out by hand: the content of every assistant message after the prompt and the
    ``trailer`` characters that follow it (``"</s>"``: the end-of-turn token; ``""``: content only)."""
    text, spans = "", []
    for k, m in enumerate(conversation):
        header = f"<|{m['role']}|>\n"
        if k >= prompt_count and m["role"] == "assistant":
            start = len(text) + len(header)
            spans.append((start, start + len(m["content"]) + len(trailer)))
        text += header + m["content"] + "</s>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [e > s and any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


def test_multi_turn_ce_trains_each_assistant_turn_end(tiny_tokenizer):
    tok = tiny_tokenizer
    user = [{"role": "user", "content": "alpha one"}]
    later = [
        {"role": "user", "content": "alpha two"},
        {"role": "assistant", "content": "gt a2"},
        {"role": "user", "content": "a user turn nobody answers"},
    ]
    rows = [_row(tok, user, "gt a1", later), _row(tok, user, "gt single")]
    s = _settings(tok, [tok.eos_token_id])
    multi, single = ce_sequences(rows, tok, s)

    conversation = [*user, {"role": "assistant", "content": "gt a1"}, *later]
    ids, mask = _expected(tok, conversation, 1, "</s>")
    assert multi.sequence == ids
    assert multi.loss_mask == mask
    eos = tok.eos_token_id
    # Two assistant turns, each ended by its own </s>; the user turns' </s> are not trained.
    assert sum(m and t == eos for m, t in zip(multi.loss_mask, ids, strict=True)) == 2
    assert ids.count(eos) == 5  # one per message
    # Single-turn rows already trained their EOS; unchanged.
    assert single.sequence[-1] == eos and single.loss_mask[-1]


def test_turn_end_is_trained_only_when_a_stop_token_ends_the_turn(tiny_tokenizer):
    """Without a stop id in the markup after a reply, nothing past the content is trained (the markup
    up to the next message belongs to the template, not to the policy)."""
    tok = tiny_tokenizer
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "bye"},
    ]
    unrelated = tok.convert_tokens_to_ids("<|system|>")
    got = conversation_tokens(tok, conversation, 1, [True, False], end_of_turn=[unrelated])
    assert got.generated_mask == _expected(tok, conversation, 1, "")[1]
    got = conversation_tokens(tok, conversation, 1, [True, False], end_of_turn=[tok.eos_token_id])
    assert got.generated_mask == _expected(tok, conversation, 1, "</s>")[1]
    # Without end_of_turn ids (the rollout side), the mask stays on the contents.
    plain = conversation_tokens(tok, conversation, 1, [True, False]).generated_mask
    assert plain == _expected(tok, conversation, 1, "")[1]
