"""Shared token prefixes of a batch of sequences, as a compressed prefix tree (pure, no torch).

The n completions of a prompt begin with the same prompt tokens; a multi-turn sample's reply views begin
with the same conversation. A causal model's hidden state at position t depends only on tokens 0..t, so
sequences that agree on their first L tokens have the same first L hidden states: those tokens need to be
computed once. The tree found here is exact by construction: every split is at the first token where two
sequences differ (or where one ends), whatever the grouping (samples of one prompt, prompts truncated
differently, a micro-batch holding only some of a prompt's samples, duplicated completions).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """A run of tokens shared by every sequence whose path passes through it.

    start: its first token's index within those sequences (its depth, = the position id of that token);
    length: its token count; parent: the node before it (None at the root); source: one sequence holding
    its tokens at [start, start + length).
    """

    start: int
    length: int
    parent: int | None
    source: int


def _common_end(seqs: list[list[int]], members: list[int], start: int) -> int:
    """First index >= start at which the ``members`` (all holding the same token at ``start``) stop
    agreeing, or where the shortest of them ends."""
    first = seqs[members[0]]
    end = min(len(seqs[i]) for i in members)
    for i in members[1:]:
        other = seqs[i]
        k = start + 1
        while k < end and other[k] == first[k]:
            k += 1
        end = k
    return end


def prefix_tree(seqs: list[list[int]]) -> tuple[list[Node], list[list[int]]]:
    """Nodes of the compressed prefix tree of ``seqs`` (every parent before its children, siblings in the
    order their sequences first appear) and, per sequence, the nodes of its path from the root (empty for an empty
    sequence). The tokens of sequence i are the concatenation of its path's nodes' tokens."""
    nodes: list[Node] = []
    paths: list[list[int]] = [[] for _ in seqs]
    # An explicit stack instead of recursion: a batch of long, mostly different sequences would be deep.
    stack: list[tuple[list[int], int, int | None]] = [(list(range(len(seqs))), 0, None)]
    while stack:
        members, start, parent = stack.pop()
        groups: dict[int, list[int]] = {}  # next token -> the members continuing with it, in batch order
        for i in members:
            if len(seqs[i]) > start:
                groups.setdefault(seqs[i][start], []).append(i)
        children = []
        for group in groups.values():
            end = _common_end(seqs, group, start)
            index = len(nodes)
            nodes.append(Node(start, end - start, parent, group[0]))
            for i in group:
                paths[i].append(index)
            children.append((group, end, index))
        stack.extend(reversed(children))  # popped in batch order: the row reads like the batch
    return nodes, paths


def separate(seqs: list[list[int]]) -> tuple[list[Node], list[list[int]]]:
    """The same structure with nothing shared: one root node per non-empty sequence."""
    nodes: list[Node] = []
    paths: list[list[int]] = []
    for i, q in enumerate(seqs):
        paths.append([len(nodes)] if q else [])
        if q:
            nodes.append(Node(0, len(q), None, i))
    return nodes, paths
