"""Time one strided EBFT optimizer step, phase by phase, at the paper's settings.

    python benchmarks/strided_step.py --hidden 256 --layers 4 --heads 4 --vocab 2048 --seq-len 1024 --docs 2

Prints seconds per optimizer step (mean, median and fastest over --steps after --warmup) with each step's
phases (generation = ``roll_out``, features + rewards = ``score_rollouts``, policy forward + backward = the
rest of the micro-batch), token-forwards per phase, peak resident memory, and each phase of the fastest and
the median step against this machine's limits: its FLOPs and bytes (``benchmarks/roofline.py`` states the
formulas) at the fp32 matmul rate and streaming bandwidth that ``benchmarks/limits.py`` measured (``--limits
FILE``; without it the model's shape is measured quickly at the end). The model is a Llama built from a
config with random weights (seed 0) and LoRA on every linear layer, fp32 on CPU; documents are
random tokens of exactly --seq-len tokens. The same settings run axolotl's trainer in
benchmarks/axolotl_strided_step.py, so the two outputs compare directly. SmolLM2-135M's shape:

    --hidden 576 --layers 30 --heads 9 --kv-heads 3 --intermediate 1536 --tied --vocab 49152

``--model PATH`` (a folder or a .gguf file) times a real checkpoint instead.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x --hidden)")
    p.add_argument("--tied", action="store_true", help="tie the input embeddings and the LM head")
    p.add_argument(
        "--model",
        default=None,
        help="a real checkpoint (folder or .gguf) instead of a model built from the sizes above",
    )
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--docs", type=int, default=2, help="documents per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="documents per micro-batch (default: --docs)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--gen", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--full-finetune", action="store_true", help="train all weights instead of LoRA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limits", default=None, help="limits.py's JSON (default: measure this shape quickly at start)")
    return p.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from ebft.data.collate import collate_documents
    from ebft.features import layer_indices
    from ebft.modeling.feature_network import FeatureNetwork
    from ebft.quickstart.scratch import llama_config
    from ebft.strided.step import (
        StepTotals,
        StridedSettings,
        count_targets,
        document_generators,
        layout_for,
        strided_microbatch,
    )

    torch.manual_seed(0)
    if args.model:
        from transformers import AutoModelForCausalLM

        from ebft.modeling.source import local_model

        model = AutoModelForCausalLM.from_pretrained(local_model(args.model, "--model"), dtype=torch.float32)
        model.config._attn_implementation = "sdpa"
        cfg = model.config
        args.hidden, args.layers, args.heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
        args.vocab = cfg.vocab_size
    else:
        cfg = llama_config(
            args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
        )
        cfg.tie_word_embeddings = args.tied
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full_finetune:
        model = get_peft_model(
            model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear")
        )
    fractions = [0.25, 0.5, 0.75]
    features = FeatureNetwork(model, layer_indices(fractions, args.layers))
    s = StridedSettings(
        stride=args.stride,
        context_length=args.context,
        generate_max_len=args.gen,
        n_samples_per_prompt=args.n,
        temperature=0.6,
        top_p=1.0,
        min_completion_prefix=0,
        embed_method="last_token",
        feature_norm="per_layer",
        use_whitening=True,
        whitening_space="feature",
        alignment_coef=1.0,
        diversity_coef=1.0,
        advantage_estimator="rloo",
        rl_coef=1.0,
        ce_coef=0.03,
    )
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.docs):
        ids = torch.randint(0, args.vocab, (args.seq_len,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    mb = args.micro_batch or args.docs
    batches = [collate_documents(rows[i : i + mb], pad_token_id=0) for i in range(0, args.docs, mb)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    layout = layout_for(batches[0], s)
    K, L, n, g = layout.k, args.seq_len, args.n, args.gen
    S = layout.total_len
    depth = max(layer_indices(fractions, args.layers))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print(
        f"model: {args.model or 'built from sizes'}, hidden {args.hidden}, layers {args.layers}, heads {args.heads}/"
        f"{cfg.num_key_value_heads} kv, intermediate {cfg.intermediate_size}, tied {cfg.tie_word_embeddings}, "
        f"vocab {args.vocab}, "
        f"trainable {sum(p.numel() for p in params):,} of {sum(p.numel() for p in model.parameters()):,}"
    )
    print(f"per document: L={L}, blocks K={K}, n={n}, g={g}, packed row S=L+g*n*K={S}")
    # Token-forwards per document (a token through the whole network counts 1; the feature pass stops
    # at layer `depth` of `layers`). Backward is about 2 forwards on top of the policy pass.
    gen_tf = L + (g - 1) * n * K
    feat_tf = S * depth / args.layers
    print(f"token-forwards/doc: generation {gen_tf}, features {feat_tf:.0f}, policy {S} (+ backward ~{2 * S})")
    ref_row = L + g * K
    ref_gen = n * (g * L + K * g * (g - 1) // 2)
    print(
        f"reference layout (n copies, no cache): generation {ref_gen}, features {n * ref_row}, "
        f"policy {n * ref_row} (+ backward ~{2 * n * ref_row})"
    )
    print(f"peak RSS before training: {peak_rss_mib():.0f} MiB")

    # Phase timers around the step's own calls (the same functions, looked up by strided_microbatch at run
    # time): generation = roll_out, features + rewards = score_rollouts, policy = the rest of the micro-batch.
    from ebft.strided import step as step_module

    clock = {"generation": 0.0, "features+rewards": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[name] += time.perf_counter() - t0

        return wrapper

    step_module.roll_out = timed("generation", step_module.roll_out)
    step_module.score_rollouts = timed("features+rewards", step_module.score_rollouts)

    records = []
    for step in range(args.warmup + args.steps):
        clock.update(dict.fromkeys(clock, 0.0))
        started = time.perf_counter()
        counts = [count_targets(b, s) for b in batches]
        totals = StepTotals(sum(c.rl_tokens for c in counts), sum(c.ce_tokens for c in counts))
        first = 0
        for b in batches:
            d = b.input_ids.shape[0]
            strided_microbatch(model, features, b, s, totals, generators=document_generators(0, step, first, d, "cpu"))
            first += d
        micro_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        phases = dict(clock, **{"policy fwd+bwd": micro_done - started - sum(clock.values())})
        phases["rest"] = elapsed - (micro_done - started)
        tag = "warmup" if step < args.warmup else "timed"
        split = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
        print(f"step {step} ({tag}): {elapsed:.2f} s [{split}], peak RSS {peak_rss_mib():.0f} MiB", flush=True)
        if step >= args.warmup:
            records.append({"seconds": elapsed, **phases})
    times = [r["seconds"] for r in records]
    fastest = min(records, key=lambda r: r["seconds"])
    median = sorted(records, key=lambda r: r["seconds"])[len(records) // 2]
    print(f"ebft_step_seconds={[round(t, 2) for t in times]}")
    print(f"ebft_seconds_per_step={statistics.mean(times):.3f}")
    print(f"ebft_median_seconds_per_step={statistics.median(times):.3f}")
    print(f"ebft_fastest_seconds_per_step={min(times):.3f}")
    print("ebft_fastest_step_phases=" + ", ".join(f"{k} {v:.2f} s" for k, v in fastest.items() if k != "seconds"))
    print(f"ebft_peak_rss_mib={peak_rss_mib():.0f}")

    # Each phase of the fastest and the median step against this machine's limits (benchmarks/roofline.py).
    from limits import limits_for
    from roofline import (
        ModelShape,
        report_phases,
        strided_feature_calls,
        strided_generation_calls,
        strided_policy_calls,
    )

    shape = ModelShape.from_config(cfg)
    limits = limits_for(shape, torch.get_num_threads(), args.limits)
    anchors = []
    for b in batches:
        lay = layout_for(b, s)
        anchors += [lay.anchors[d][lay.valid[d]].tolist() for d in range(lay.num_docs)]
    ce = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches) // len(anchors) if s.ce_coef > 0 else 0
    work = {
        "generation": strided_generation_calls(shape, L, anchors, n, g),
        "features+rewards": strided_feature_calls(shape, L, anchors, n, g, depth),
        "policy fwd+bwd": strided_policy_calls(
            shape, L, anchors, n, g, ce_targets=ce, weights_train=args.full_finetune
        ),
    }
    print(
        f"limits ({limits.source}, {limits.threads} threads): streaming read {limits.bandwidth_gb_s:.1f} GB/s, "
        f"fp32 matmul {limits.rate(shape, 'body', 1024) / 1e9:.0f} GFLOP/s (body, 1024 rows)"
    )
    for label, record in (("fastest", fastest), ("median", median)):
        for r in report_phases(label, record, work, shape, limits):
            print(f"ebft_{label}_fraction_{r.name.split()[0].split('+')[0]}={r.fraction:.3f}")


if __name__ == "__main__":
    main()
