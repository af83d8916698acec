"""Generation quality on held-out Python functions: does the sampled body parse, and does it repeat itself?

Prompts: functions of the held-out standard-library files whose reference body is short (``MAX_BODY_TOKENS``):
the prompt is the file up to the end of the ``def`` line or of its docstring, without the newline after it
(the last ``PROMPT_TOKENS`` tokens; a prompt ending in a bare newline would split the newline-plus-indent
token the model always saw whole), and the model writes the newline and the body. A completion ends at the
first non-blank line indented no deeper than the ``def`` (the function is over) or at ``MAX_NEW_TOKENS``.

Per completion:

* ``parses``: the ``def`` line, docstring and completed body compile as Python (``ast.parse`` after
  dedenting); a body still open at the token limit counts as not parsing;
* ``finished``: the body ended before the token limit;
* ``distinct2``: distinct token bigrams / bigrams of the body (1 = no bigram repeated);
* ``repeated_lines``: fraction of the body's non-blank lines that repeat an earlier line of the same body.
"""

from __future__ import annotations

import ast
import json
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MAX_BODY_TOKENS = 80
MAX_NEW_TOKENS = 80
PROMPT_TOKENS = 192


@dataclass(frozen=True)
class FunctionPrompt:
    path: str
    name: str
    prompt: str  # the file up to the body (the header and docstring included), without the last newline
    header: str  # the def line(s) and docstring without the last newline, for the parse check
    indent: int  # columns of the def keyword
    reference: str  # the real body


def function_prompts(heldout_jsonl: Path, tokenizer, limit: int) -> list[FunctionPrompt]:
    """Up to ``limit`` functions of the held-out files with short bodies, spread over the files."""
    per_file: list[list[FunctionPrompt]] = []
    for line in heldout_jsonl.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        text = item["text"]
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        found = []
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.body:
                continue
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
            body_nodes = node.body[1:] if has_doc else node.body
            if not body_nodes or node.decorator_list:
                continue
            body_start = body_nodes[0].lineno - 1
            header_start = node.lineno - 1
            body = "".join(lines[body_start : node.end_lineno])
            if len(tokenizer(body, add_special_tokens=False)["input_ids"]) > MAX_BODY_TOKENS:
                continue
            if "\n" not in body.rstrip("\n") and len(body.strip()) < 20:  # one-liners like `pass`
                continue
            found.append(
                FunctionPrompt(
                    path=item["path"],
                    name=node.name,
                    prompt="".join(lines[:body_start]).removesuffix("\n"),
                    header="".join(lines[header_start:body_start]).removesuffix("\n"),
                    indent=node.col_offset,
                    reference=body,
                )
            )
        if found:
            per_file.append(sorted(found, key=lambda f: f.prompt.count("\n")))
    out: list[FunctionPrompt] = []
    depth = 0
    while len(out) < limit and any(depth < len(f) for f in per_file):
        for functions in per_file:
            if depth < len(functions) and len(out) < limit:
                out.append(functions[(depth * 7919) % len(functions)] if depth else functions[len(functions) // 2])
        depth += 1
    return out


def cut_body(text: str, indent: int) -> tuple[str, bool]:
    """The completion up to the end of the function: (body, finished). The completion's first line ends
    the header's line (normally it is just the newline), so only the lines after it are checked."""
    first, newline, rest = text.partition("\n")
    kept = [first + newline]
    for line in rest.splitlines(keepends=True):
        stripped = line.strip()
        if stripped and len(line) - len(line.lstrip()) <= indent:
            return "".join(kept), True
        kept.append(line)
    return "".join(kept), False


def parses(header: str, body: str) -> bool:
    try:
        ast.parse(textwrap.dedent(header + body))
    except (SyntaxError, ValueError):
        return False
    return True


def distinct_2(ids: list[int]) -> float:
    pairs = list(zip(ids, ids[1:], strict=False))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def repeated_lines(body: str) -> float:
    lines = [line.strip() for line in body.partition("\n")[2].splitlines() if line.strip()]
    if not lines:
        return 0.0
    seen, repeats = set(), 0
    for line in lines:
        repeats += line in seen
        seen.add(line)
    return repeats / len(lines)


@dataclass
class Completion:
    prompt: int
    sample: int
    text: str
    finished: bool
    parses: bool
    distinct2: float
    repeated_lines: float


@torch.no_grad()
def sample_completions(policy, tokenizer, prompts: list[FunctionPrompt], n: int, temperature: float, seed: int):
    """``n`` completions per prompt (same seeds for every model): list of ``Completion``."""
    out = []
    policy.eval()
    for p_index, prompt in enumerate(prompts):
        ids = tokenizer(prompt.prompt, add_special_tokens=False)["input_ids"][-PROMPT_TOKENS:]
        prefix = torch.tensor([ids] * n)
        torch.manual_seed(seed * 100_003 + p_index)
        generated = policy.generate(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=MAX_NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, row in enumerate(generated[:, len(ids) :].tolist()):
            text = tokenizer.decode(row, skip_special_tokens=True)
            body, finished = cut_body(text, prompt.indent)
            body_ids = tokenizer(body.partition("\n")[2], add_special_tokens=False)["input_ids"]
            out.append(
                Completion(
                    prompt=p_index,
                    sample=i,
                    text=body,
                    finished=finished,
                    parses=finished and parses(prompt.header, body),
                    distinct2=distinct_2(body_ids),
                    repeated_lines=repeated_lines(body),
                )
            )
    return out


def summarise(completions: list[Completion]) -> dict:
    """Per-prompt means (the unit for standard errors) of each measure."""
    by_prompt: dict[int, list[Completion]] = {}
    for c in completions:
        by_prompt.setdefault(c.prompt, []).append(c)
    per_prompt = [
        {key: sum(float(getattr(c, key)) for c in group) / len(group) for key in GEN_KEYS}
        for _, group in sorted(by_prompt.items())
    ]
    return {"per_prompt": per_prompt, "completions": [asdict(c) for c in completions]}


GEN_KEYS = ("parses", "finished", "distinct2", "repeated_lines")
