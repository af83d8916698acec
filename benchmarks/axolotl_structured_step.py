"""Time axolotl 0.19.0's structured EBFT trainer without vLLM on CPU (baseline for ebft's structured mode).

Run with the interpreter of the venv that has axolotl installed (how to make it: axolotl_strided_step.py),
after benchmarks/structured_step.py has written the shared model, tokenizer and data to --workdir::

    python benchmarks/structured_step.py --workdir /tmp/ebft_structured_bench --threads 2
    /work/axolotl-venv/bin/python benchmarks/axolotl_structured_step.py --workdir /tmp/ebft_structured_bench --threads 2

What is measured: ``AxolotlEBFTTrainer`` (axolotl's ``EBFTMixin`` over ``AxolotlGRPOTrainer``, i.e. TRL
``GRPOTrainer``; the class axolotl picks for ``rl: ebft``, ``ebft.mode: structured`` without
``async_prefetch``/``use_data_producer``) driven by its own ``Trainer.train()`` loop, with ``use_vllm``
off so TRL generates with transformers ``generate``. Per optimizer step: one generation batch of
per_device_train_batch_size x gradient_accumulation_steps completions (2 prompts x 4), axolotl's
feature-matching reward function over all of them, TRL's group advantages, then per micro-batch the
policy forward (log-probs of the completion tokens) and backward, grad clip, AdamW, zero_grad.

The training arguments are the ones axolotl's ``EBFTStrategy.set_training_args_kwargs`` forwards
from an ``ebft:``/``trl:`` config block, set directly on ``AxolotlEBFTConfig`` (no YAML, no axolotl
model loader). The model is the folder ebft's script saved (Llama from a config, random weights,
seed 0), loaded in fp32 with SDPA attention and wrapped in PEFT LoRA (r 16, alpha 32, all linear
layers), as axolotl's loader would hand it to the trainer.

Full-length completions: ``trl.generation_kwargs: {min_new_tokens: max_completion_length}`` (TRL
merges it into the GenerationConfig, so transformers masks EOS until then), as ebft's script sets
``min_new_tokens`` on the policy's generation config.

CPU shims: none. Unlike the strided trainer, this path runs on CPU unmodified (it prints
``shims=none``). The phase timers wrap
TRL's ``_generate``, axolotl's reward function (in ``trainer.reward_funcs``), TRL's ``_compute_loss``
and ``accelerator.backward``; they call the wrapped functions unchanged.

Output lines::

    axolotl_step_seconds=[...]            timed steps (after --warmup)
    axolotl_seconds_per_step=<mean>
    axolotl_fastest_seconds_per_step=<min>
    axolotl_peak_rss_mib=<ru_maxrss of this process, MiB>
    axolotl_{fastest,median}_fraction_{generation,features,policy}=<phase's least work at the limits / seconds>

(the fractions against ``benchmarks/limits.py``'s measurements, ``--limits FILE``, formulas in roofline.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ebft_structured_bench"))
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="completions per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limits", default=None, help="limits.py's JSON (default: measure this shape quickly at the end)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--varied", action="store_true", help="natural stopping: no forced min_new_tokens")
    return p.parse_args(argv)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("axolotl", "torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def report_padding(seen: dict) -> None:
    """Padding share per phase from the recorded lengths: TRL generates every row of a generation batch
    until its longest completion ends and pads prompt and completion to the batch's longest for the loss;
    the feature batches are recorded as (shape, real tokens)."""
    real_gen = pad_gen = real_pol = pad_pol = 0
    for prompts, comps in zip(seen["prompt_tokens"], seen["completion_tokens"], strict=True):
        real_gen += sum(comps)
        pad_gen += len(comps) * max(comps)
        real_pol += sum(prompts) + sum(comps)
        pad_pol += len(comps) * (max(prompts) + max(comps))
    real_feat = sum(real for _, real, _ in seen["feature_batches"])
    pad_feat = sum(shape[0] * shape[1] for shape, _, _ in seen["feature_batches"])
    flat_p = [n for batch in seen["prompt_tokens"] for n in batch]
    flat_c = [n for batch in seen["completion_tokens"] for n in batch]
    print(f"prompt_tokens min {min(flat_p)} median {statistics.median(flat_p):g} max {max(flat_p)}")
    print(f"completion_tokens min {min(flat_c)} median {statistics.median(flat_c):g} max {max(flat_c)}")
    print(
        f"padding_share decode {100 * (1 - real_gen / pad_gen):.0f}%, "
        f"features {100 * (1 - real_feat / pad_feat):.0f}%, policy {100 * (1 - real_pol / pad_pol):.0f}%"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    if not (work / "model").is_dir() or not (work / "data.jsonl").is_file():
        print(f"error: {work} has no model/ and data.jsonl; run benchmarks/structured_step.py --workdir {work} first")
        return 2

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from axolotl.core.trainers.ebft import EBFTStrategy
    from axolotl.core.trainers.ebft import trainer as ebft_trainer_module
    from axolotl.core.trainers.ebft.args import AxolotlEBFTConfig
    from axolotl.core.trainers.ebft.trainer import AxolotlEBFTTrainer
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    for k, v in versions().items():
        print(f"version_{k}={v}")
    print(f"loadavg_start={os.getloadavg()} cpu_count={os.cpu_count()}")
    print(f"torch_num_threads={torch.get_num_threads()} cuda_available={torch.cuda.is_available()}")

    # --- the same config block an axolotl YAML would carry, and the trainer class axolotl picks ---
    axo_cfg = DictDefault(
        {
            "rl": "ebft",
            "ebft": {
                "mode": "structured",
                "feature_layers": [0.25, 0.5, 0.75],
                "embed_method": "last_token",
                "use_whitening": True,
                "alignment_coef": 1.0,
                "diversity_coef": 1.0,
                "adaptive_max_tokens": False,
            },
            "trl": {
                "use_vllm": False,
                "num_generations": args.num_generations,
                "max_completion_length": args.max_completion,
                "temperature": 1.0,
                "top_p": 1.0,
                "scale_rewards": "group",
                "loss_type": "grpo",
                "epsilon": 0.2,
                "generation_kwargs": {} if args.varied else {"min_new_tokens": args.max_completion},
            },
        }
    )
    trainer_cls = EBFTStrategy.get_trainer_class(axo_cfg)
    args_cls = EBFTStrategy.get_training_args_class(axo_cfg)
    ebft_kwargs = EBFTStrategy.set_training_args_kwargs(axo_cfg)
    assert trainer_cls is AxolotlEBFTTrainer and args_cls is AxolotlEBFTConfig, (trainer_cls, args_cls)
    print(f"trainer_class={trainer_cls.__name__} args_class={args_cls.__name__} strategy_kwargs={ebft_kwargs}")

    # --- model, tokenizer, data: the folder ebft's script wrote ---
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    base = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model_params_total={n_all} trainable={n_train} vocab={len(tokenizer)}")
    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    train_dataset = Dataset.from_list(rows)

    out_dir = tempfile.mkdtemp(prefix="axo_structured_bench_")
    total_steps = args.warmup + args.steps
    targs = AxolotlEBFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=total_steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        gradient_checkpointing=False,
        beta=0.0,
        **ebft_kwargs,
    )

    trainer = AxolotlEBFTTrainer(model=model, args=targs, train_dataset=train_dataset, processing_class=tokenizer)
    print(
        f"trainer_share_feature_weights={trainer._share_feature_weights} "
        f"feature_layers={trainer.feature_layer_indices} use_vllm={trainer.use_vllm} "
        f"generation_batch_size={trainer.args.generation_batch_size} "
        f"steps_per_generation={trainer.args.steps_per_generation} device={trainer.args.device} "
        f"generation_config.min_new_tokens={trainer.generation_config.min_new_tokens} "
        f"eos_token_id={trainer.generation_config.eos_token_id}"
    )

    # --- phase timers (each calls the wrapped function unchanged) ---
    phases = {"generation": 0.0, "features+rewards": 0.0, "policy fwd+bwd": 0.0}
    seen: dict[str, list] = {"completion_tokens": [], "feature_batches": []}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] += time.perf_counter() - t0

        wrapper.__name__ = getattr(fn, "__name__", name)
        return wrapper

    generate = trainer._generate
    truth_tokens = {
        r["prompt"]: len(tokenizer(r["ground_truth"], add_special_tokens=False)["input_ids"])
        for r in rows
        if isinstance(r["prompt"], str)
    }

    def generate_and_count(prompts):
        out = generate(prompts)
        seen["completion_tokens"].append([len(c) for c in out[1]])
        seen.setdefault("prompt_tokens", []).append([len(tokenizer(p)["input_ids"]) for p in prompts])
        seen.setdefault("truth_tokens", []).append([truth_tokens.get(p, 0) for p in prompts])
        return out

    trainer._generate = timed("generation", generate_and_count)
    trainer.reward_funcs = [timed("features+rewards", f) for f in trainer.reward_funcs]
    trainer._compute_loss = timed("policy fwd+bwd", trainer._compute_loss)
    trainer.accelerator.backward = timed("policy fwd+bwd", trainer.accelerator.backward)

    extract = ebft_trainer_module.extract_hidden_states

    def extract_and_record(model_, input_ids, attention_mask, layer_indices, batch_size=None):
        body = getattr(model_, "model", None)
        seen["feature_batches"].append(
            (tuple(input_ids.shape), int(attention_mask.sum()), type(body).__name__ if body is not None else None)
        )
        return extract(model_, input_ids, attention_mask, layer_indices, batch_size)

    ebft_trainer_module.extract_hidden_states = extract_and_record

    # --- time optimizer steps through the Trainer's own loop ---
    step_times: list[float] = []
    step_phases: list[dict] = []

    class StepTimer(TrainerCallback):
        t0 = None

        def on_step_begin(self, a, state, control, **kw):
            for k in phases:
                phases[k] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            step_times.append(dt)
            step_phases.append(dict(phases))
            split = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items())
            print(
                f"step {state.global_step}: {dt:.3f}s [{split}, rest {dt - sum(phases.values()):.2f} s] "
                f"peak_rss_mib={rss_mib():.1f}",
                flush=True,
            )

    trainer.add_callback(StepTimer())
    print(f"peak_rss_before_train_mib={rss_mib():.1f}", flush=True)

    t_start = time.perf_counter()
    trainer.train()
    t_total = time.perf_counter() - t_start

    timed_steps = step_times[args.warmup :]
    if len(step_times) != total_steps or not timed_steps:
        print(f"error: expected {total_steps} steps, got {len(step_times)}")
        return 1
    fastest = min(range(args.warmup, total_steps), key=lambda i: step_times[i])
    print("shims=none")
    print(f"completion_lengths_per_step={seen['completion_tokens']}")
    print(f"feature_batches (input shape, real tokens, body type)={seen['feature_batches']}")
    report_padding(seen)
    print(f"step_times_s={[round(t, 3) for t in step_times]} (first {args.warmup} untimed)")
    print(f"train_wall_s={t_total:.2f}")
    print(f"loadavg_end={os.getloadavg()}")
    print(f"axolotl_step_seconds={[round(t, 2) for t in timed_steps]}")
    print(f"axolotl_seconds_per_step={statistics.mean(timed_steps):.3f}")
    print(f"axolotl_median_seconds_per_step={statistics.median(timed_steps):.3f}")
    print(f"axolotl_fastest_seconds_per_step={step_times[fastest]:.3f}")
    p = step_phases[fastest]
    print(
        "axolotl_fastest_step_phases="
        + ", ".join(f"{k} {v:.2f} s" for k, v in p.items())
        + f", rest {step_times[fastest] - sum(p.values()):.2f} s"
    )
    print(f"axolotl_peak_rss_mib={rss_mib():.1f}")
    median = sorted(range(args.warmup, total_steps), key=lambda i: step_times[i])[len(timed_steps) // 2]
    report_limits(args, base.config, seen, {"fastest": fastest, "median": median}, step_times, step_phases)
    return 0


def report_limits(args, config, seen: dict, which: dict, step_times: list, step_phases: list) -> None:
    """Each phase of the fastest and the median step against this machine's limits, counted from the step's
    own completions as the least work the step needs (benchmarks/roofline.py; the counts ebft's
    structured_step.py uses): each prompt computed once, whatever layout TRL and axolotl use."""
    import torch
    from limits import limits_for
    from roofline import (
        ModelShape,
        report_phases,
        structured_feature_calls,
        structured_generation_calls,
        structured_policy_calls,
    )

    shape = ModelShape.from_config(config)
    depth = max(int(f * shape.layers) for f in (0.25, 0.5, 0.75))
    limits = limits_for(shape, torch.get_num_threads(), args.limits)
    G = args.num_generations
    for label, i in which.items():
        prompts = seen["prompt_tokens"][i][::G]  # TRL repeats each prompt for its G samples
        truths = seen["truth_tokens"][i][::G]
        lengths = seen["completion_tokens"][i]
        completions = [lengths[p * G : (p + 1) * G] for p in range(len(prompts))]
        work = {
            "generation": structured_generation_calls(shape, prompts, completions),
            "features+rewards": structured_feature_calls(shape, prompts, completions, truths, depth),
            "policy fwd+bwd": structured_policy_calls(shape, prompts, completions, weights_train=False),
        }
        record = {"seconds": step_times[i], **step_phases[i]}
        for r in report_phases(label, record, work, shape, limits):
            print(f"axolotl_{label}_fraction_{r.name.split()[0].split('+')[0]}={r.fraction:.3f}")


if __name__ == "__main__":
    sys.exit(main())
