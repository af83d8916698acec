"""The timed runs of ``gpu_check.py``: optimizer steps of the strided and the structured trainer.

Each run goes through ebft's own pieces: a ``TrainConfig`` from ``parse_config``, the policy made by
``ebft.modeling.policy.prepare_policy`` (dtype, gradient checkpointing, LoRA) from a Llama built from a config in
memory (random weights, seed 0; no hub), ``feature_network_for``, ``build_optimizer``, the mode's
runner (``StridedRunner`` / ``StructuredRunner`` with ``HFGenerate``), ``clip_grad_norm``. The runner is
handed a ``PhaseClock`` as its sharding: it times what the runner does under ``gathered()`` (rollouts and
feature scoring); the rest of ``runner.run`` is the policy pass with its backward.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from gpu_check_limits import strided_at_limits, structured_at_limits


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool


# Llama shapes. The 1B and 3B rows are Llama-3.2-1B and -3B (tied embeddings, GQA with 8 KV heads);
# the tiny ones keep the dry run fast and still cover GQA, tied and untied heads.
SHAPES = {
    "llama-3.2-1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "llama-3.2-3b": Shape(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, tied=True),
    "tiny-a": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, tied=True),
    "tiny-b": Shape(hidden=96, layers=3, heads=6, kv_heads=2, intermediate=192, vocab=512, tied=False),
}

# Hybrid models (Gated DeltaNet 3 : 1 full attention, Qwen3.5's layout), structured mode only: the tiny one keeps the
# dry run fast; "qwen3.5-small" is what the GPU runs (random weights, seed 0; transformers' own kernels).
HYBRIDS = {
    "qwen3.5-small": {
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 8,
        "heads": 8,
        "vocab": 32000,
    },
    "qwen3.5-tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "heads": 2, "vocab": 512},
}


def vocab_of(shape: str) -> int:
    return HYBRIDS[shape]["vocab"] if shape in HYBRIDS else SHAPES[shape].vocab


FLOP_FORMULA = (
    "policy-pass FLOPs per optimizer step = (2 + 2w) * (N_layers * T + N_head * T_head) + 12 * P * d_attn * n_layers. "
    "N_layers: weight matrices of the decoder layers (embedding lookup, norms and LoRA adapters not counted); "
    "N_head: LM-head weights (vocab x hidden); T: tokens through the decoder body (packed rows in strided mode, "
    "unpadded sequences in structured mode); T_head: rows through the LM head (scored tokens and CE targets); "
    "P: (query, key) pairs the attention mask allows; d_attn: heads x head_dim. 2 FLOPs per multiply-add: forward 2, "
    "input gradients 2, weight gradients 2 only where weights train (w = 2 full fine-tune, w = 1 LoRA). Attention: "
    "4 P d_attn forward (QK^T, PV), 8 P d_attn backward. Recomputation (gradient checkpointing, the chunked LM head) "
    "is not counted. MFU = these FLOPs / policy-pass seconds / peak."
)


def synchronizer(device: torch.device):
    """Wait for queued kernels before reading a clock (a no-op on CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


class PhaseClock:
    """The runner's ``Sharding`` of an unsharded policy, timing every ``gathered()`` block (rollouts and
    feature scoring, the no-grad phase). Everything else is delegated to ``ebft.train.distributed.Sharding``."""

    def __init__(self, model, sync):
        from ebft.train.distributed import Sharding

        self._inner, self._sync, self.seconds = Sharding(model), sync, 0.0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @contextmanager
    def gathered(self):
        self._sync()
        started = time.perf_counter()
        with self._inner.gathered():
            yield
        self._sync()
        self.seconds += time.perf_counter() - started


def train_config(
    mode: str, *, adapter: str | None, seq_len: int, micro: int, gas: int, gc: bool, trl=None, torch_dtype=None
):
    """The run's TrainConfig, validated like a user's YAML (the paper's settings, bf16 autocast; ``torch_dtype``:
    the dtype the weights are stored and trained in, the config key of that name)."""
    from ebft.config import parse_config

    ebft = {"mode": mode, "feature_layers": [0.25, 0.5, 0.75], "embed_method": "last_token", "use_whitening": True}
    ebft |= {"alignment_coef": 1.0, "diversity_coef": 1.0, "rl_coef": 1.0, "ce_coef": 0.03}
    if mode == "strided":
        ebft |= {"stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 4}
        ebft |= {"temperature": 0.6, "advantage_estimator": "rloo"}
    else:
        ebft |= {"adaptive_max_tokens": False}
    raw = {
        "base_model": "gpu_check: a Llama built from a config in memory",
        "rl": "ebft",
        "ebft": ebft,
        "datasets": [{"path": "gpu_check: random tokens"}],
        "sequence_len": seq_len,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": gas,
        "learning_rate": 1e-5,
        "optimizer": "adamw_torch",
        "max_grad_norm": 1.0,
        "bf16": True,  # the dry run on CPU goes through the same autocast path
        "gradient_checkpointing": gc,
        "seed": 0,
        "output_dir": "gpu_check_unused",
    }
    if adapter == "lora":
        raw |= {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True}
    if trl is not None:
        raw["trl"] = trl
    if torch_dtype is not None:
        raw["torch_dtype"] = torch_dtype
    return parse_config(raw, source="benchmarks/gpu_check.py")


def build_policy(shape: str, cfg, device: torch.device):
    """A randomly initialised Llama of ``SHAPES[shape]`` (or Qwen3.5-style hybrid of ``HYBRIDS[shape]``) made into
    the config's policy, built on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3_5TextConfig

    from ebft.modeling.policy import prepare_policy
    from ebft.modeling.precision import policy_dtype

    if shape in HYBRIDS:
        h = HYBRIDS[shape]
        config = Qwen3_5TextConfig(
            vocab_size=h["vocab"],
            hidden_size=h["hidden_size"],
            intermediate_size=h["intermediate_size"],
            num_hidden_layers=h["num_hidden_layers"],
            num_attention_heads=h["heads"],
            num_key_value_heads=h["heads"] // 2,
            head_dim=64,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
            linear_num_key_heads=h["heads"] // 2,
            linear_num_value_heads=h["heads"],
            layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (h["num_hidden_layers"] // 4),
            max_position_embeddings=4096,
        )
    else:
        s = SHAPES[shape]
        config = LlamaConfig(
            vocab_size=s.vocab,
            hidden_size=s.hidden,
            intermediate_size=s.intermediate,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads,
            tie_word_embeddings=s.tied,
            max_position_embeddings=4096,
        )
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 3B model's init on the CPU takes tens of seconds
        model = AutoModelForCausalLM.from_config(config, dtype=policy_dtype(cfg, device), attn_implementation="sdpa")
    return prepare_policy(model, cfg, device)


@dataclass(frozen=True)
class Dims:
    """What the FLOP count needs from a model (see FLOP_FORMULA)."""

    layer_params: int
    head_params: int
    attn_width: int
    layers: int

    @classmethod
    def of(cls, model) -> Dims:
        from ebft.modeling.parts import backbone_of

        c = model.config
        layers = backbone_of(model).layers
        # Weight matrices only: norms are elementwise, adapters are left out of the count.
        base = sum(p.numel() for name, p in layers.named_parameters() if p.dim() == 2 and "lora_" not in name)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(base, c.vocab_size * c.hidden_size, c.num_attention_heads * head_dim, c.num_hidden_layers)


def policy_flops(dims: Dims, *, tokens: int, head_tokens: int, attn_pairs: int, full_finetune: bool) -> float:
    """FLOP_FORMULA for one pass; e.g. N_layers 10, N_head 4, T 3, T_head 2, P 6, d_attn 2, 1 layer, LoRA:
    4 * (10*3 + 4*2) + 12 * 6 * 2 * 1 = 152 + 144 = 296."""
    w = 2 if full_finetune else 1
    matmuls = (2 + 2 * w) * (dims.layer_params * tokens + dims.head_params * head_tokens)
    return float(matmuls + 12 * attn_pairs * dims.attn_width * dims.layers)


def strided_document_counts(layout, ce_targets: int) -> tuple[int, int, int]:
    """(T, T_head, P) of one document's policy pass: its packed row of S = L + g n K tokens; the head
    scores every valid generated token and the CE targets; the document attends causally (L(L+1)/2
    pairs) and generated token (i, k, t) sees c_k document keys and t + 1 keys of its own rollout."""
    L, n, g = layout.doc_len, layout.n, layout.g
    anchors = layout.anchors[0].tolist()
    gen_pairs = n * sum(g * c + g * (g + 1) // 2 for c in anchors)
    scored = int(layout.valid[0].sum()) * n * g
    return layout.total_len, scored + ce_targets, L * (L + 1) // 2 + gen_pairs


def structured_counts(samples, references) -> tuple[int, int, int]:
    """(T, T_head, P) of the policy passes over ``samples`` and the CE ``references`` (unpadded)."""
    from ebft.structured.step import loss_views

    tokens = head = pairs = 0
    for q in list(samples) + list(references):
        for seq, mask in loss_views(q):
            tokens += len(seq)
            head += sum(mask[1:])
            pairs += len(seq) * (len(seq) + 1) // 2
    return tokens, head, pairs


def _random_ids(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()  # 0-2: the tokenizer's special ids


def _measure(runner, cfg, policy, clock, device, *, warmup: int, steps: int, deadline: float, flops_of_step):
    """Warm-up steps, then up to ``steps`` timed optimizer steps while the next one fits before ``deadline``."""
    from ebft.train.checkpoint import TrainState
    from ebft.train.distributed import clip_grad_norm
    from ebft.train.optim import build_optimizer
    from ebft.train.reporting import peak_memory_bytes

    sync = synchronizer(device)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    state = TrainState()
    runner.start(state)
    policy.train()

    def one_step(step: int) -> dict:
        clock.seconds = 0.0
        sync()
        t0 = time.perf_counter()
        out = runner.run(step, state)
        sync()
        t1 = time.perf_counter()
        clip_grad_norm(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runner.after_update(step)
        state.step = step
        sync()
        t2 = time.perf_counter()
        return {
            "seconds": t2 - t0,
            "rollout_and_features": clock.seconds,
            "policy": t1 - t0 - clock.seconds,
            "optimizer": t2 - t1,
            "policy_flops": flops_of_step(runner),
            "stats": out.stats,
        }

    records, stopped = [], None
    for step in range(1, warmup + steps + 1):
        if records and step > warmup + 1 and time.monotonic() + 1.3 * records[-1]["seconds"] > deadline:
            break
        try:
            records.append(one_step(step))
        except TimeoutError:  # the part's cap: keep what was measured, if anything
            if not records:
                raise
            stopped = f"the time cap interrupted step {step}"
            break
    timed = records[warmup:] or records[-1:]  # a warm-up step stands in when no timed step fit
    best = min(timed, key=lambda r: r["seconds"])
    metrics = runner.metrics(best["stats"], 1, best["seconds"])
    return {
        "stopped": stopped,
        "first_step_seconds": round(records[0]["seconds"], 3),
        "step_seconds": [round(r["seconds"], 3) for r in timed],
        "timed_steps": len(records) - warmup if len(records) > warmup else 0,
        "fastest_step_seconds": round(best["seconds"], 3),
        "phases_of_fastest": {k: round(best[k], 3) for k in ("rollout_and_features", "policy", "optimizer")},
        "tokens_per_second": round(metrics["tokens_per_second"], 1),
        "peak_memory_mib": round(peak_memory_bytes(device) / 2**20),
        "policy_flop_per_step": best["policy_flops"],
        "policy_tflops": float(f"{best['policy_flops'] / max(best['policy'], 1e-9) / 1e12:.4g}"),
    }


def strided_run(
    shape: str,
    adapter: str | None,
    device,
    *,
    seq_len: int,
    micro: int,
    gas: int,
    gc: bool,
    warmup,
    steps,
    deadline,
    peak: dict,
    torch_dtype: str | None = None,
):
    """Optimizer steps of the strided trainer at the paper's settings on random-token documents."""
    from accelerate import Accelerator

    from ebft.data.collate import collate_documents
    from ebft.modeling.feature_network import feature_network_for
    from ebft.strided.runner import StridedRunner
    from ebft.strided.step import layout_for

    cfg = train_config(
        "strided", adapter=adapter, seq_len=seq_len, micro=micro, gas=gas, gc=gc, torch_dtype=torch_dtype
    )
    policy = build_policy(shape, cfg, device)
    features = feature_network_for(cfg, policy, device)
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPES[shape].vocab
    rows = [{"input_ids": ids, "labels": ids} for ids in (_random_ids(gen, vocab, seq_len) for _ in range(64))]
    clock = PhaseClock(policy, synchronizer(device))
    runner = StridedRunner(
        cfg,
        model=policy,
        features=features,
        tokenizer=SimpleNamespace(pad_token_id=0, decode=lambda ids: " ".join(map(str, ids))),  # random weights: ids
        data=SimpleNamespace(train=rows, val=None),
        accelerator=Accelerator(cpu=device.type == "cpu"),
        autocast_dtype=features.autocast_dtype,
        sharding=clock,
    )
    # Every document is seq_len real tokens, so every document has the same layout.
    layout = layout_for(collate_documents(rows[:1], pad_token_id=0), runner.settings)
    T, T_head, P = strided_document_counts(layout, ce_targets=seq_len - 1)
    dims = Dims.of(policy)
    per_doc = policy_flops(dims, tokens=T, head_tokens=T_head, attn_pairs=P, full_finetune=adapter is None)
    out = _measure(
        runner,
        cfg,
        policy,
        clock,
        device,
        warmup=warmup,
        steps=steps,
        deadline=deadline,
        flops_of_step=lambda _runner: per_doc * micro * gas,
    )
    docs = micro * gas
    sizes = {
        "documents": docs,
        "doc_tokens": docs * seq_len,
        "generated_tokens": docs * int(layout.valid.sum()) * layout.n * layout.g,
    }
    # roll_out picks the attention path: the compiled flex BlockMask on CUDA, the chunked SDPA plan elsewhere.
    attention = "flex-compiled" if device.type == "cuda" else "sparse-sdpa"
    extra = {"attention": attention, "gradient_checkpointing": gc, "precision": _precision(cfg, device)}
    extra["weights"] = str(next(p for n, p in policy.named_parameters() if "lora_" not in n).dtype)
    out["at_limits"] = strided_at_limits(policy, cfg, device, layout, out, peak, micro=micro, gas=gas)
    return {"packed_row_tokens": T, **sizes, **extra, **out}


def structured_run(
    shape: str,
    adapter: str | None,
    device,
    *,
    prompts: int,
    generations: int,
    prompt_tokens: int,
    completion_tokens: int,
    micro: int,
    gc: bool,
    warmup,
    steps,
    deadline,
    peak: dict,
):
    """Optimizer steps of the structured trainer, rollouts forced to full length (the shared-prefill decoder,
    which is also what hybrid models sample with)."""
    from accelerate import Accelerator

    from ebft.data.structured import PromptRow
    from ebft.modeling.feature_network import feature_network_for
    from ebft.quickstart.scratch import train_tokenizer
    from ebft.structured.hf import HFGenerate
    from ebft.structured.rollout import Sampling
    from ebft.structured.runner import StructuredRunner

    trl = {"num_generations": generations, "max_completion_length": completion_tokens, "temperature": 0.7}
    trl |= {"scale_rewards": "group", "loss_type": "grpo", "epsilon": 0.2}
    gas = prompts * generations // micro
    seq_len = prompt_tokens + completion_tokens
    cfg = train_config("structured", adapter=adapter, seq_len=seq_len, micro=micro, gas=gas, gc=gc, trl=trl)
    policy = build_policy(shape, cfg, device)
    # Completions run to the full length (transformers masks EOS until min_new_tokens), so every step
    # does the same work; the tokenizer only decodes completions for logs and names the EOS id.
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    base.generation_config.min_new_tokens = completion_tokens
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300)
    gen = torch.Generator().manual_seed(0)
    vocab = vocab_of(shape)
    rows = [
        PromptRow(
            prompt="",
            ground_truth="",
            remaining_turns=(),
            prompt_ids=tuple(_random_ids(gen, vocab, prompt_tokens)),
            gt_ids=tuple(_random_ids(gen, vocab, completion_tokens)),
            source=f"gpu_check random row {i}",
        )
        for i in range(64)
    ]
    features = feature_network_for(cfg, policy, device)
    amp = features.autocast_dtype
    sampling = Sampling.from_trl(cfg.trl, tokenizer.eos_token_id)
    clock = PhaseClock(policy, synchronizer(device))
    runner = StructuredRunner(
        cfg,
        model=policy,
        features=features,
        tokenizer=tokenizer,
        data=SimpleNamespace(train=rows, val=None),
        accelerator=Accelerator(cpu=device.type == "cpu"),
        autocast_dtype=amp,
        backend=HFGenerate(policy, sampling=sampling, pad_token_id=tokenizer.pad_token_id, autocast_dtype=amp),
        sharding=clock,
    )
    dims = Dims.of(policy)

    def flops(r) -> float:
        T, T_head, P = structured_counts(r.buffer.samples, r.buffer.references(tokenizer, r.s))
        return policy_flops(dims, tokens=T, head_tokens=T_head, attn_pairs=P, full_finetune=adapter is None)

    out = _measure(
        runner, cfg, policy, clock, device, warmup=warmup, steps=steps, deadline=deadline, flops_of_step=flops
    )
    sizes = {
        "completions": prompts * generations,
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
    }
    out["at_limits"] = structured_at_limits(policy, cfg, device, out, peak, sizes | {"prompts": prompts})
    return {**sizes, "gradient_checkpointing": gc, "precision": _precision(cfg, device), **out}


def _precision(cfg, device) -> str:
    from ebft.modeling.precision import autocast_dtype

    return "bf16" if autocast_dtype(cfg, device) is not None else "fp32"
