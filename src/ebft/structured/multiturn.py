"""Multi-turn rollouts: each sample continues its own conversation, turn by turn (docs/design.md §6).

A multi-turn row carries the turns after its first assistant reply (``PromptRow.remaining_turns``).
After the first turn (sampled with the single-turn prompts), every sample's conversation gets the row's
next user / tool / system messages as they are, and the policy's own reply in place of each ground-truth
assistant message; all samples waiting for a reply are generated together, one turn at a time.
"""

from __future__ import annotations

from ebft.data.structured import PromptRow
from ebft.structured.chat import conversation_tokens, render_prompt_ids
from ebft.structured.rollout import Completion, RolloutBackend, Sample, mix_seed
from ebft.structured.settings import StructuredSettings, completion_cap


def _content(c: Completion, s: StructuredSettings, tokenizer) -> str:
    ids = [t for t in c.ids if t not in s.sampling.stop_token_ids]
    return tokenizer.decode(ids, skip_special_tokens=True)


def roll_out_conversations(
    backend: RolloutBackend,
    rows: list[PromptRow],
    first: list[list[Completion]],
    s: StructuredSettings,
    tokenizer,
    seeds: list[int],
) -> dict[tuple[int, int], Sample]:
    """Roll out every sample of every multi-turn row to the end of its own conversation.

    Each sample keeps its own message list: the ground-truth user (or tool/system) messages of the row
    are appended as they come, and every ground-truth assistant message is replaced by the policy's
    reply to *that sample's* conversation so far. Keys are (prompt index, sample index), so samples of
    different prompts in one batch never mix.
    """
    G = s.num_generations
    convs: dict[tuple[int, int], list[dict]] = {}
    generated: dict[tuple[int, int], list[bool]] = {}
    finished: dict[tuple[int, int], bool] = {}
    pending: dict[tuple[int, int], list[dict]] = {}
    turns: dict[tuple[int, int], list[tuple[tuple[int, ...], Completion]]] = {}
    for p, row in enumerate(rows):
        if not row.remaining_turns:
            continue
        for j in range(G):
            c = first[p][j]
            convs[p, j] = [*row.prompt, {"role": "assistant", "content": _content(c, s, tokenizer)}]
            generated[p, j] = [True]
            finished[p, j] = c.finished
            pending[p, j] = list(row.remaining_turns)
            turns[p, j] = [(tuple(row.prompt_ids), c)]
    turn = 0
    while True:
        waiting, contexts, caps, turn_seeds = [], [], [], []
        for key, todo in pending.items():
            while todo and todo[0].get("role") != "assistant":
                convs[key].append(dict(todo.pop(0)))
                generated[key].append(False)
            if todo:
                target = todo.pop(0)
                context = render_prompt_ids(tokenizer, convs[key], s.chat_template_kwargs)
                # The sample is cut at sequence_len: a reply gets at most the room left before it.
                room = s.sequence_len - len(context)
                if room <= 0:
                    # Nothing from here on is kept: end the conversation with an empty reply (its header is
                    # part of the context the sample is cut in) and generate nothing; the sample is truncated.
                    convs[key].append({"role": "assistant", "content": ""})
                    generated[key].append(True)
                    finished[key] = False
                    todo.clear()
                    continue
                waiting.append(key)
                contexts.append(context)
                gt_len = len(tokenizer(target.get("content", ""), add_special_tokens=False)["input_ids"])
                caps.append(min(completion_cap(gt_len, s), room))
                turn_seeds.append(mix_seed(seeds[key[0]], key[1], turn + 1))
        if not waiting:
            break
        turn += 1
        replies = backend.generate(contexts, 1, caps, turn_seeds)
        for key, context, reply in zip(waiting, contexts, replies, strict=True):
            turns[key].append((tuple(context), reply[0]))
            convs[key].append({"role": "assistant", "content": _content(reply[0], s, tokenizer)})
            generated[key].append(True)
            finished[key] = finished[key] and reply[0].finished

    out = {}
    for key, conv in convs.items():
        row = rows[key[0]]
        tokens = conversation_tokens(tokenizer, conv, len(row.prompt), generated[key], s.chat_template_kwargs)
        ids, mask = tokens.ids[: s.sequence_len], tokens.generated_mask[: s.sequence_len]
        trained = finished[key] or not s.mask_truncated_completions
        behaviour = None
        if all(c.logprobs is not None for _, c in turns[key]):
            # The sampler's log-probs line up with the replies' ids, the loss tokens of the turn views.
            behaviour = [v for _, c in turns[key] for v in (c.logprobs or ())] if trained else []  # all present
        out[key] = Sample(
            sequence=list(ids),
            prompt_length=tokens.prompt_length,
            loss_mask=[m and trained for m in mask],
            feature_length=len(ids),
            finished=finished[key],
            text=tokenizer.decode(ids[tokens.prompt_length :], skip_special_tokens=False),
            behaviour_logprobs=behaviour,
            generated_tokens=sum(len(c.ids) for _, c in turns[key]),
            turns=tuple((context, tuple(c.ids)) for context, c in turns[key]),
            trained=trained,
        )
    return out
