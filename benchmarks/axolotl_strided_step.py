"""Time axolotl 0.19.0's strided EBFT trainer on CPU (baseline for ebft's strided trainer).

Run with the interpreter of a separate venv that has axolotl installed, e.g.::

    /work/axolotl-venv/bin/python benchmarks/axolotl_strided_step.py \
        --hidden 256 --layers 4 --heads 4 --vocab 2048 --seq-len 1024 \
        --docs 2 --n 4 --stride 8 --context 8 --gen 8

That venv (never ebft's own) holds axolotl 0.19.0 on the same torch, transformers and peft as ebft's, so the
two programs run the same library code; axolotl itself without its dependency pins (it pins transformers
5.16.1, peft 0.20.0 and many CUDA packages), and only the packages its EBFT trainers import::

    python3 -m venv /work/axolotl-venv
    /work/axolotl-venv/bin/pip install torch==2.13.0 transformers==5.25.0 peft==0.21.2 accelerate==1.16.0 \
        datasets==5.2.0 tokenizers==0.23.3 trl==1.9.0 addict numba requests pillow triton typing-extensions==4.15.0
    /work/axolotl-venv/bin/pip install --no-deps axolotl==0.19.0 axolotl-contribs-lgpl==0.0.7 \
        axolotl-contribs-mit==0.0.6

What is measured: ``AxolotlStridedEBFTTrainer`` driven by its own ``Trainer.train()`` loop
(compute_loss -> backward -> grad clip -> AdamW step -> zero_grad), one optimizer step per
``--docs`` documents (micro-batch = docs, no gradient accumulation). The first ``--warmup`` steps
are excluded from the timing. Output lines::

    axolotl_seconds_per_step=<mean over timed steps>
    axolotl_peak_rss_mib=<ru_maxrss of this process, MiB>
    axolotl_fastest_fraction_step=<the step's least work at this machine's limits / its seconds>

(the last against ``benchmarks/limits.py``'s measurements, ``--limits FILE``; the FLOP and byte formulas are
in ``benchmarks/roofline.py``).

CPU shims (axolotl 0.19.0 assumes CUDA on this path; each is reported at run time):

1. ``AxolotlStridedEBFTTrainer.__init__`` picks the feature network with
   ``torch.cuda.device_count()``. With 0 GPUs a PEFT model is *not* given the shared-weights
   path (that needs exactly 1 GPU); it falls to the "single-GPU, non-PEFT" branch, which
   deep-copies the model, casts it to bf16 and calls ``.to("cuda:0")`` -> crash. The script
   first tries the unmodified constructor (to record that error), then reconstructs with
   ``torch.cuda.device_count()`` reporting 1 *only for calls made from strided.py*, which selects
   the branch axolotl uses for a PEFT model on one device (feature net = actor under
   ``disable_adapter()``, SDPA, dense mask), and finally sets ``trainer._feature_device`` (which
   that branch hard-codes to ``cuda:0``) to the CPU.
2. The feature pass builds its dense mask in bf16 (hard-coded) while, without CUDA, every
   ``torch.autocast(device_type="cuda")`` block is disabled so q/k/v stay fp32, and SDPA rejects a
   bf16 float mask with fp32 queries. Only if that error actually occurs, the script wraps HF's
   registered "sdpa" attention function to cast a floating mask to the query dtype (the same kind
   of wrapper axolotl itself installs for flex_attention), and reports it.

Everything else (mask builders, generation loop, per-row training forward, rewards, loss) is
axolotl's code unchanged. ``torch.cuda.empty_cache()`` is a no-op without CUDA; flex_attention is
not used because axolotl enables it only when ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def current_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x --hidden)")
    p.add_argument("--tied", action="store_true", help="tie the input embeddings and the LM head")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--docs", type=int, default=2, help="documents per optimizer step (micro-batch)")
    p.add_argument("--n", type=int, default=4, help="samples per document")
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--gen", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="enable HF gradient checkpointing (use_reentrant=True, as axolotl forces for strided)",
    )
    p.add_argument("--limits", default=None, help="limits.py's JSON (default: measure this shape quickly at the end)")
    return p.parse_args(argv)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "axolotl",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "trl",
        "triton",
        "numba",
        "datasets",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from axolotl.core.trainers.ebft import strided
    from axolotl.core.trainers.ebft.args import AxolotlStridedEBFTConfig
    from axolotl.core.trainers.ebft.strided import AxolotlStridedEBFTTrainer
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    for k, v in versions().items():
        print(f"version_{k}={v}")
    print(f"loadavg_start={os.getloadavg()} cpu_count={os.cpu_count()}")
    print(f"torch_num_threads={torch.get_num_threads()} cuda_available={torch.cuda.is_available()}")
    print(f"axolotl_strided_module={strided.__file__}")
    print(f"flex_attention_importable={strided._FLEX_ATTENTION_AVAILABLE}")

    # --- model: tiny Llama, same sizes as ebft.quickstart.scratch.llama_config, fp32, seed 0 ---
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(4096, 2 * args.seq_len + args.gen * args.seq_len // args.stride),
        tie_word_embeddings=args.tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"  # axolotl sets this itself without CUDA; set it up front too
    torch.manual_seed(args.seed)
    base = LlamaForCausalLM(cfg).to(torch.float32)
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model_params_total={n_all} trainable={n_train}")
    print(
        f"model_shape=hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{cfg.num_key_value_heads} kv, "
        f"intermediate {cfg.intermediate_size}, tied {cfg.tie_word_embeddings}, vocab {args.vocab}"
    )

    # --- data: random token documents of exactly seq_len tokens ---
    g = torch.Generator().manual_seed(args.seed)
    docs = torch.randint(0, args.vocab, (args.docs, args.seq_len), generator=g)
    train_dataset = [
        {"input_ids": docs[i], "attention_mask": torch.ones(args.seq_len, dtype=torch.long)} for i in range(args.docs)
    ]

    out_dir = tempfile.mkdtemp(prefix="axo_strided_bench_")
    total_steps = args.warmup + args.steps
    targs = AxolotlStridedEBFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.docs,
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True} if args.gradient_checkpointing else None,
        ebft_stride=args.stride,
        ebft_context_length=args.context,
        ebft_generate_max_len=args.gen,
        ebft_n_samples_per_prompt=args.n,
        # the rest stay at axolotl's defaults: feature_layers [0.25,0.5,0.75], last_token,
        # no whitening, alignment 1, diversity 1, ce 0, temperature 0.6, top_p 1, rloo, rl_coef 1
    )

    # --- construct the trainer; first unmodified, to record where it needs CUDA ---
    shims: list[str] = []
    trainer = None
    try:
        trainer = AxolotlStridedEBFTTrainer(model=model, args=targs, train_dataset=train_dataset)
        print("cuda_requirement_init=none (constructor ran unmodified)")
    except Exception as exc:  # noqa: BLE001 - we want to report whatever it is
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((fr for fr in reversed(tb) if fr.filename == strided.__file__), tb[-1])
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(
            "cuda_requirement_init="
            f"{os.path.basename(where.filename)}:{where.lineno} in {where.name}: "
            f"`{where.line}` -> {type(exc).__name__}: {msg}"
        )

    if trainer is None:
        orig_device_count = torch.cuda.device_count

        def device_count_for_strided():
            caller = sys._getframe(1).f_code.co_filename
            return 1 if caller == strided.__file__ else orig_device_count()

        torch.cuda.device_count = device_count_for_strided
        try:
            trainer = AxolotlStridedEBFTTrainer(model=model, args=targs, train_dataset=train_dataset)
        finally:
            torch.cuda.device_count = orig_device_count
        shims.append("init: torch.cuda.device_count()->1 for strided.py only (PEFT shared-weights branch)")
    if getattr(trainer, "_feature_device", None) is not None and trainer._feature_device.type == "cuda":
        trainer._feature_device = torch.device("cpu")
        shims.append("trainer._feature_device cuda:0 -> cpu")

    print(
        f"trainer_share_feature_weights={getattr(trainer, '_share_feature_weights', None)} "
        f"use_flex_attention={trainer.use_flex_attention} "
        f"feature_layers={trainer.feature_layer_indices} "
        f"attn_impl={trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation} "
        f"device={trainer.args.device}"
    )

    # --- SDPA dtype shim, installed only if the unmodified feature pass fails on it ---
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    orig_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_mask_to_query_dtype(module, query, key, value, attention_mask, **kwargs):
        if (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.is_floating_point()
            and attention_mask.dtype != query.dtype
        ):
            attention_mask = attention_mask.to(query.dtype)
        return orig_sdpa(module, query, key, value, attention_mask, **kwargs)

    orig_rewards = trainer._compute_block_rewards

    def rewards_with_fallback(*a, **kw):
        try:
            return orig_rewards(*a, **kw)
        except RuntimeError as exc:
            if "attn_mask" not in str(exc) or ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask_to_query_dtype:
                raise
            print(f"cuda_requirement_features=SDPA feature pass: {str(exc).splitlines()[0]}")
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_mask_to_query_dtype
            shims.append("feature pass: sdpa attention fn casts float mask to query dtype")
            return orig_rewards(*a, **kw)

    trainer._compute_block_rewards = rewards_with_fallback

    # --- time optimizer steps through the Trainer's own loop ---
    step_times: list[float] = []
    step_rss: list[float] = []

    class StepTimer(TrainerCallback):
        t0 = None

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            step_times.append(dt)
            step_rss.append(rss_mib())
            print(f"step {state.global_step}: {dt:.3f}s peak_rss_mib={rss_mib():.1f}", flush=True)

    trainer.add_callback(StepTimer())

    S, g_, s, a = args.seq_len, args.gen, args.stride, args.context
    nb = (S - g_ - a) // s + 1
    print(f"layout: seq_len={S} num_blocks={nb} full_len={S + g_ * nb} rows_per_step={args.docs * args.n}")
    print(f"rss_before_train_mib={current_rss_mib():.1f} peak_rss_before_train_mib={rss_mib():.1f}", flush=True)

    t_start = time.perf_counter()
    trainer.train()
    t_total = time.perf_counter() - t_start

    timed = step_times[args.warmup :]
    if len(step_times) != total_steps or not timed:
        print(f"error: expected {total_steps} steps, got {len(step_times)}")
        return 1
    mean = sum(timed) / len(timed)
    median = statistics.median(timed)
    print(f"shims={shims if shims else 'none'}")
    print(f"step_times_s={[round(t, 3) for t in step_times]} (first {args.warmup} untimed)")
    print(f"train_wall_s={t_total:.2f}")
    print(f"loadavg_end={os.getloadavg()}")
    print(f"axolotl_seconds_per_step={mean:.4f}")
    print(f"axolotl_median_seconds_per_step={median:.4f} axolotl_min_seconds_per_step={min(timed):.4f}")
    print(f"axolotl_peak_rss_mib={rss_mib():.1f}")
    report_limits(args, cfg, timed)
    return 0


def report_limits(args, cfg, timed: list[float]) -> None:
    """The fastest and the median step against this machine's limits: the least work of a strided step at
    these settings (benchmarks/roofline.py, the counts ebft's strided_step.py uses; no CE term, axolotl's
    ce_coef default is 0), whatever layout axolotl computes it with."""
    import torch
    from limits import limits_for
    from roofline import (
        ModelShape,
        phase_report,
        strided_feature_calls,
        strided_generation_calls,
        strided_policy_calls,
    )

    shape = ModelShape.from_config(cfg)
    limits = limits_for(shape, torch.get_num_threads(), args.limits)
    L, g, n = args.seq_len, args.gen, args.n
    anchors = [list(range(args.context, L - g + 1, args.stride))] * args.docs
    depth = max(int(f * args.layers) for f in (0.25, 0.5, 0.75))
    calls = strided_generation_calls(shape, L, anchors, n, g) + strided_feature_calls(shape, L, anchors, n, g, depth)
    calls += strided_policy_calls(shape, L, anchors, n, g, ce_targets=0, weights_train=False)
    for label, seconds in (("fastest", min(timed)), ("median", statistics.median(timed))):
        r = phase_report("step", seconds, calls, shape, limits)
        print(f"{label} step against the limits ({limits.source}, {limits.threads} threads): {r.line()}")
        print(f"axolotl_{label}_fraction_step={r.fraction:.3f}")


if __name__ == "__main__":
    sys.exit(main())
