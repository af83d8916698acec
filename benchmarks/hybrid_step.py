"""Time one structured-mode step on tiny hybrid and recurrent models: the rollout path ebft chooses (the shared-prefill
decoder) against transformers ``generate``, same draws, on CPU.

    python benchmarks/hybrid_step.py --threads 1 --repeats 5

For each model (a Qwen3.5-style Gated DeltaNet / attention hybrid, 3:1, and a Mamba-2, both built from a config
with random weights, seed 0, LoRA r=16 on every linear layer PEFT accepts), one step is: ``roll_out`` (P prompts x
n samples, natural stopping on a handful of frequent tokens, a cap of --cap tokens), ``score`` (the frozen feature
network, padded, rewards, advantages) and ``microbatch`` over every completion (policy forward, GRPO loss,
backward). The decoder and ``generate`` draw the very same completions (checked on every repeat), so both
paths do the same work after the rollouts. Repeats alternate the two paths; the table gets the median and the
fastest wall and CPU (process) seconds of each phase, and the median fraction of this machine's limits that
each phase's CPU seconds reach (``benchmarks/roofline.py`` counts, ``benchmarks/limits.py`` rates, ``--limits``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from limits import limits_for

from ebft import features as feat
from ebft import losses
from ebft.data.structured import PromptRow
from ebft.modeling.adapters import add_adapter
from ebft.modeling.feature_network import FeatureNetwork
from ebft.structured.hf import HFGenerate
from ebft.structured.rollout import Sampling
from ebft.structured.scoring import score
from ebft.structured.settings import StructuredSettings
from ebft.structured.step import RolloutBuffer, microbatch, roll_out

VOCAB = 2048
MODELS = {
    "qwen3_5_text": (
        "Qwen3_5TextConfig",
        {
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "layer_types": ["linear_attention"] * 3
            + ["full_attention"]
            + ["linear_attention"] * 3
            + ["full_attention"],
        },
    ),
    "mamba2": (
        "Mamba2Config",
        {
            "hidden_size": 256,
            "num_hidden_layers": 8,
            "num_heads": 8,
            "head_dim": 64,
            "state_size": 64,
            "n_groups": 1,
            "chunk_size": 64,
        },
    ),  # fmt: skip
}
TOKENIZER = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: " ".join(map(str, ids)))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--cap", type=int, default=96)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--limits", default=None, help="limits.py's JSON (default: each model's shape measured quickly)")
    return p.parse_args()


def build(name: str):
    import transformers

    cls, extra = MODELS[name]
    config = getattr(transformers, cls)(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # a peakier policy than the near-uniform random init: stop tokens get drawn
        model.get_output_embeddings().weight.mul_(8.0)
    lora = SimpleNamespace(
        lora_model_dir=None,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_target_linear=True,
        lora_target_modules=None,
    )
    return add_adapter(lora, model)


def settings(cap: int, samples: int) -> StructuredSettings:
    return StructuredSettings(
        num_generations=samples,
        max_completion_length=cap,
        adaptive_max_tokens=False,
        gt_length_multiplier=1.5,
        sampling=Sampling(temperature=1.0, stop_token_ids=(2, *range(100, 140))),
        embed_method="last_token",
        feature_norm="per_layer",
        use_whitening=False,
        whitening_space="feature",
        alignment_coef=1.0,
        diversity_coef=1.0,
        scale_rewards="group",
        loss_type="grpo",
        eps_low=0.2,
        eps_high=0.2,
        num_iterations=1,
        mask_truncated_completions=False,
        skip_zero_advantage_batches=False,
        is_correction=False,
        is_bounds=(1 / 3.0, 3.0),
        rl_coef=1.0,
        ce_coef=0.0,
        sequence_len=args.prompt_tokens + cap,
    )


def rows(count: int, length: int) -> list[PromptRow]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        prompt = tuple(torch.randint(150, VOCAB, (length - i * 7,), generator=gen).tolist())
        answer = tuple(torch.randint(150, VOCAB, (48,), generator=gen).tolist())
        out.append(PromptRow(f"p{i}", f"g{i}", (), prompt, answer, "bench"))
    return out


def hybrid_shape(policy):
    """The model's matrices for benchmarks/roofline.py (``ModelShape.of_model``: recurrent mixing not counted,
    so the fractions are upper bounds of the true ones)."""
    from roofline import ModelShape

    from ebft.modeling.parts import backbone_of

    return ModelShape.of_model(policy.config, backbone_of(policy).layers)


def fractions(policy, batch, drawn, times, limits) -> dict[str, float]:
    """Each phase's CPU seconds against this machine's limits (benchmarks/roofline.py counts, limits.py rates)."""
    from roofline import (
        phase_report,
        structured_feature_calls,
        structured_generation_calls,
        structured_policy_calls,
    )

    shape = hybrid_shape(policy)
    depth = max(feat.layer_indices([0.25, 0.5, 0.75], shape.layers))
    prompts = [len(r.prompt_ids) for r in batch]
    lengths = [len(q) - prompts[i // args.samples] for i, q in enumerate(drawn)]
    completions = [lengths[p * args.samples : (p + 1) * args.samples] for p in range(len(batch))]
    truths = [len(r.gt_ids) for r in batch]
    work = {
        "rollouts": structured_generation_calls(shape, prompts, completions),
        "features": structured_feature_calls(shape, prompts, completions, truths, depth),
        "policy": structured_policy_calls(shape, prompts, completions, weights_train=False),
    }
    return {k: phase_report(k, times[k][1], calls, shape, limits).fraction for k, calls in work.items()}


def step(policy, backend, batch, s, seeds) -> tuple[dict[str, tuple[float, float]], list]:
    """One step's phases: {phase: (wall seconds, CPU seconds)} and the completions drawn."""
    times = {}

    def timed(phase, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        times[phase] = (time.perf_counter() - wall, time.process_time() - cpu)
        return out

    samples = timed("rollouts", lambda: roll_out(backend, batch, s, TOKENIZER, seeds))
    layers = feat.layer_indices([0.25, 0.5, 0.75], policy.config.num_hidden_layers)
    scores = timed("features", lambda: score(FeatureNetwork(policy, layers), batch, samples, s, 0, batch_size=16))
    norm = losses.LossNorm(len(samples), sum(sum(q.loss_mask[1:]) for q in samples), s.max_completion_length, 1)
    buffer = RolloutBuffer(batch, samples, scores, scores.advantage.reshape(-1), 0)
    policy.train()
    timed("policy", lambda: microbatch(policy, buffer, list(range(len(samples))), [], s, norm, 0, TOKENIZER, pad_id=0))
    policy.eval()
    policy.zero_grad(set_to_none=True)
    return times, [q.sequence for q in samples]


def main() -> None:
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for name in args.models:
        policy = build(name)
        s = settings(args.cap, args.samples)
        batch = rows(args.prompts, args.prompt_tokens)
        paths = {
            "decoder": HFGenerate(policy, sampling=s.sampling, pad_token_id=0),
            "generate": HFGenerate(policy, sampling=s.sampling, pad_token_id=0, shared_prefill=False),
        }
        assert paths["decoder"].shared_prefill
        results: dict[str, list[dict]] = {path: [] for path in paths}
        at_limit: dict[str, list[dict]] = {path: [] for path in paths}
        limits = limits_for(hybrid_shape(policy), args.threads, args.limits)
        lengths = None
        for r in range(args.repeats + 1):  # the first round warms up
            seeds = [1000 * r + p for p in range(args.prompts)]
            drawn = {}
            for path, backend in paths.items():
                times, drawn[path] = step(policy, backend, batch, s, seeds)
                if r:
                    results[path].append(times)
                    at_limit[path].append(fractions(policy, batch, drawn[path], times, limits))
            assert drawn["decoder"] == drawn["generate"], "the two paths drew different completions"
            lengths = [len(q) - len(batch[i // args.samples].prompt_ids) for i, q in enumerate(drawn["decoder"])]
        print(f"\n{name}: {args.prompts} prompts x {args.samples} samples, prompts of ~{args.prompt_tokens} tokens, "
              f"completion lengths (last repeat) mean {statistics.mean(lengths):.1f}, min {min(lengths)}, "
              f"max {max(lengths)} of cap {args.cap}")  # fmt: skip
        print("| path | phase | median wall s | fastest wall s | median CPU s | median CPU s at the limit |")
        print("|---|---|---|---|---|---|")
        for path, runs in results.items():
            for phase in ("rollouts", "features", "policy", "step"):
                if phase == "step":
                    walls = [sum(t[0] for t in run.values()) for run in runs]
                    cpus = [sum(t[1] for t in run.values()) for run in runs]
                    share = ""
                else:
                    walls, cpus = [run[phase][0] for run in runs], [run[phase][1] for run in runs]
                    share = f"{100 * statistics.median(f[phase] for f in at_limit[path]):.0f}%"
                print(f"| {path} | {phase} | {statistics.median(walls):.3f} | {min(walls):.3f} | "
                      f"{statistics.median(cpus):.3f} | {share} |")  # fmt: skip


if __name__ == "__main__":
    args = parse()
    main()
