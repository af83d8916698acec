"""A per-device memory plan of a training run from the model's shape and the config alone (no weights).

Pure arithmetic on counts; every figure is bytes. ``b(x)`` is the byte size of dtype x (float32 4,
bfloat16 2); P_train the trainable parameters, P the policy's parameters. The terms (docs/guide.md,
"Memory plan"):

* weights: P x b(storage). With LoRA the frozen base is stored in its dtype, or quantised on the decoder's
  linear layers (4-bit NF4 with double quantisation: 0.5 B + one 8-bit scale per 64 weights + one fp32
  scale per 256 of those = 0.5 + 1/64 + 4/16384 B a weight; 8-bit: 1 B + one fp32 scale per output row,
  taken as 1 B), the rest in the storage dtype; the adapters (P_train) in fp32.
* gradients: P_train x b(parameter dtype).
* optimizer state: AdamW 2 x P_train x b(parameter dtype) (torch keeps both moments in the parameter's
  dtype); SGD without momentum keeps none. Under FSDP2 weights, gradients and state are split over the
  processes (divided by their number).
* frozen feature network: a copy holds the embeddings, the layers up to the deepest feature layer and (when
  that is the last layer) the final norm, in its own dtype; 0 when it shares the policy's weights.
* activations: the largest of four phases, which never run at the same time:
  - generation: the KV cache, positions x attention layers x 2 (keys, values) x kv width x b(compute),
    plus one decoding step's logits, rows x vocab x (b(compute) + 4) (the head's output and its fp32 copy),
    plus one layer's working set over the prefill; in structured mode with LoRA over fp32 weights and fp32
    compute on one process, the adapters merged into a copy of the adapted matrices (``merged_adapters``), at
    most the decoder's linear weights x 4 B.
  - feature pass (no grad): each captured layer's hidden state, tokens x h x (b(compute) + 4) (as computed
    and as the fp32 copy returned), plus one layer's working set.
  - policy pass (with grad): what backward needs of one layer, per token 4h + 4q + 4kv + 4I values (the two
    norms' inputs and outputs, the q/k/v projections and their rotary copies, the attention output, the MLP's
    gate, activation, up and product; h hidden, q and kv the attention widths, I the MLP width) in
    b(compute), kept for every layer; with gradient checkpointing only each layer's input (h values a token)
    is kept and one layer is recomputed at a time. Plus the LM head's log-prob chunk (three [rows, vocab] fp32
    tensors), and with autocast over fp32 trained weights the bf16 copies it keeps for backward (2 B a weight).
  - optimizer step: torch's (foreach) AdamW forms sqrt(v) / sqrt(1 - beta2^t) + eps for every trainable
    weight at once before it updates them, a temporary of P_train x b(parameter dtype); the fused AdamW
    and SGD need none.
  A layer's working set (no grad) is h + q + 2kv + 2I values a token. Under FSDP2 the rollouts and the
  feature pass hold the whole policy (gathered) on top of their share.
* runtime: the CUDA context (about 0.5 GiB) on a GPU; the process's own footprint is not counted on a CPU.

These are estimates of what the tensors need; allocator caching and fragmentation come on top (leave about
10% free on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ebft.losses import CHUNK_ELEMENTS

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT = GIB // 2
# NF4 with double quantisation: 4 bits, an 8-bit absmax per block of 64, an fp32 scale per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# [rows, vocab] fp32 tensors a log-prob chunk's softmax holds at once (rows x vocab <= CHUNK_ELEMENTS).
LOGPROB_CHUNK_TENSORS = 3
OPTIMIZER_STEP = "optimizer step"


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: parameter counts by part and the widths activations scale with."""

    vocab: int
    hidden: int
    intermediate: int
    q_width: int  # attention heads x head dim
    kv_width: int  # key/value heads x head dim
    layer_params: tuple[int, ...]
    attention_layers: int  # layers that keep a KV cache (the others are recurrent or linear attention)
    embedding_params: int
    head_params: int  # an untied LM head; 0 when tied to the embeddings
    final_norm_params: int
    other_params: int  # parameters outside the body's embeddings, layers and final norm and the head
    linear_params: int  # weights of the decoder's linear layers (what bitsandbytes quantises)
    adapter_params: int = 0  # LoRA parameters of the config; 0 without an adapter

    @property
    def layers(self) -> int:
        return len(self.layer_params)

    @property
    def total_params(self) -> int:
        body = self.embedding_params + sum(self.layer_params) + self.final_norm_params
        return body + self.head_params + self.other_params

    @property
    def hybrid(self) -> bool:
        """Recurrent or linear-attention layers: such models run padded, not packed."""
        return self.attention_layers < self.layers


@dataclass(frozen=True)
class Precision:
    """Dtype names: the policy's weights (its frozen base with LoRA), the compute and a frozen feature copy."""

    weights: str
    compute: str
    features: str
    quantised_bits: int | None = None  # 4 or 8: a bitsandbytes base (LoRA only)


@dataclass(frozen=True)
class Training:
    """How the policy trains on one process."""

    lora: bool
    optimizer: str  # "adamw" (torch's foreach implementation), "adamw_fused" or "sgd"
    checkpointing: bool
    shards: int = 1  # FSDP2: processes the policy is sharded over
    feature_copy: bool = True  # False: the feature network is the policy's own weights
    feature_depth: int = 0  # the deepest feature layer (0 = embeddings)
    feature_layers: int = 1  # distinct layers the feature network returns


@dataclass(frozen=True)
class Workload:
    """Token counts of the three phases on one process (see ``strided_workload`` / ``structured_workload``)."""

    cache_positions: int  # KV-cache positions alive at once during generation (0: generation elsewhere)
    decode_rows: int  # rows of one decoding step's logits
    prefill_tokens: int  # tokens of the largest prefill forward
    feature_tokens: int  # tokens of one feature-network forward
    policy_tokens: int  # tokens of one policy forward with gradient
    logprob_rows: int  # rows the LM head scores in that forward
    merged_sampling: bool = False  # rollouts sample through merged LoRA weights (structured mode, on device)


@dataclass(frozen=True)
class Term:
    label: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Phase:
    name: str
    terms: tuple[Term, ...]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


@dataclass(frozen=True)
class DevicePlan:
    """What one device holds: fixed terms (weights, state, runtime) and the phases run on it, of which only
    the largest is counted (they never overlap): the activation phases and the optimizer step."""

    device: str
    role: str
    terms: tuple[Term, ...]
    phases: tuple[Phase, ...]
    capacity: int | None = None  # bytes of the device's memory; None when unknown

    @property
    def activation_phase(self) -> Phase | None:
        """The activation phase that peaks (generation, feature pass or policy pass)."""
        candidates = [p for p in self.phases if p.name != OPTIMIZER_STEP]
        return max(candidates, key=lambda p: p.bytes) if candidates else None

    @property
    def activations(self) -> int:
        phase = self.activation_phase
        return phase.bytes if phase is not None else 0

    @property
    def transient(self) -> int:
        """The largest phase, the optimizer step included."""
        return max((p.bytes for p in self.phases), default=0)

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms) + self.transient

    @property
    def headroom(self) -> int | None:
        """capacity - total (negative: by how much it does not fit); None when the capacity is unknown."""
        return None if self.capacity is None else self.capacity - self.total


def strided_workload(
    *, sequence_len: int, stride: int, first_anchor: int, gen_len: int, samples: int, docs: int, ce: bool
) -> Workload:
    """Strided mode on one process: ``docs`` documents of ``sequence_len`` tokens per micro-batch.

    K = (L - g - a) // stride + 1 blocks (a: the first anchor), the packed row S = L + g n K. Generation
    caches all D rows (D S positions) and decodes D n K rows a step; the feature pass reads the D rows at
    once; the policy pass runs one row at a time (S tokens) and scores its n K g generated tokens (+ L - 1
    for CE).
    """
    blocks = (
        max((sequence_len - gen_len - first_anchor) // stride + 1, 1) if first_anchor + gen_len <= sequence_len else 1
    )
    row = sequence_len + gen_len * samples * blocks
    return Workload(
        cache_positions=docs * row,
        decode_rows=docs * samples * blocks,
        prefill_tokens=docs * sequence_len,
        feature_tokens=docs * row,
        policy_tokens=row,
        logprob_rows=samples * blocks * gen_len + (sequence_len - 1 if ce else 0),
    )


def structured_workload(
    *,
    sequence_len: int,
    completion_len: int,
    generations: int,
    micro_batch: int,
    prompts: int,
    feature_batch: int,
    on_device: bool,
    shared_prefill: bool,
    packed: bool,
) -> Workload:
    """Structured mode on one process: ``prompts`` prompts of up to Lp = L - C tokens per rollout batch, each
    with G completions of up to C tokens; ``micro_batch`` completions per policy pass.

    Generation on the training device (``on_device``) caches P (Lp + G C) positions when each prompt is
    prefilled once (``shared_prefill``), P G (Lp + C) when every completion has its own copy (transformers
    ``generate``). The feature pass reads ``feature_batch`` sequences at a time; packed rows hold each
    prompt once (ceil(B / G) Lp + B C tokens), padded rows B L (hybrid models). The policy pass reads the
    micro-batch's completions and the at most ceil(m / G) + 1 prompts they belong to.
    """
    prompt_len = sequence_len - completion_len
    G = generations
    cache = prompts * (prompt_len + G * completion_len) if shared_prefill else prompts * G * sequence_len
    seqs = min(feature_batch, prompts * G)
    if packed:
        feature_tokens = math.ceil(seqs / G) * prompt_len + seqs * completion_len
        spanned = min(micro_batch, math.ceil(micro_batch / G) + 1)
        policy_tokens = spanned * prompt_len + micro_batch * completion_len
    else:
        feature_tokens, policy_tokens = seqs * sequence_len, micro_batch * sequence_len
    return Workload(
        cache_positions=cache if on_device else 0,
        decode_rows=prompts * G if on_device else 0,
        prefill_tokens=prompts * prompt_len if on_device else 0,
        feature_tokens=feature_tokens,
        policy_tokens=policy_tokens,
        logprob_rows=micro_batch * completion_len,
        merged_sampling=on_device,
    )


def feature_network_params(shape: ModelShape, depth: int) -> int:
    """Parameters of a frozen copy cut after layer ``depth``: embeddings, layers 1..depth (at least one: hidden
    state 0 is read on its way into layer 0), and the body's final norm, which the cut view keeps (its output is
    not read, but it is part of the copy)."""
    return shape.embedding_params + sum(shape.layer_params[: max(depth, 1)]) + shape.final_norm_params


def weight_bytes(shape: ModelShape, precision: Precision, training: Training) -> tuple[int, int]:
    """(bytes of the frozen weights, bytes of the trained ones) of the policy on one process."""
    stored = BYTES[precision.weights]
    if not training.lora:
        return 0, _split(shape.total_params * stored, training.shards)
    if precision.quantised_bits is not None:
        per_weight = NF4_BYTES if precision.quantised_bits == 4 else 1.0
        frozen = shape.linear_params * per_weight + (shape.total_params - shape.linear_params) * stored
    else:
        frozen = shape.total_params * stored
    return _split(int(frozen), training.shards), _split(shape.adapter_params * 4, training.shards)


def state_terms(shape: ModelShape, precision: Precision, training: Training) -> list[Term]:
    """The policy's weights, gradients and optimizer state on one process, with what they are."""
    frozen, trained = weight_bytes(shape, precision, training)
    trainable = shape.adapter_params if training.lora else shape.total_params
    param_dtype = "float32" if training.lora else precision.weights
    shard = f", 1/{training.shards} (FSDP2)" if training.shards > 1 else ""
    terms = []
    if training.lora:
        base = f"{precision.quantised_bits}-bit" if precision.quantised_bits else precision.weights
        terms.append(Term("frozen base weights", frozen, f"{count(shape.total_params)} params, {base}{shard}"))
        terms.append(Term("trained weights", trained, f"{count(trainable)} LoRA params, float32{shard}"))
    else:
        master = "" if param_dtype == "float32" else ", no float32 master copy"
        terms.append(Term("trained weights", trained, f"{count(trainable)} params, {param_dtype}{master}{shard}"))
    grads = _split(trainable * BYTES[param_dtype], training.shards)
    terms.append(Term("gradients", grads, f"{param_dtype}{shard}"))
    if training.optimizer == "sgd":
        terms.append(Term("optimizer state", 0, "SGD without momentum keeps none"))
    else:
        state = _split(2 * trainable * BYTES[param_dtype], training.shards)
        terms.append(Term("optimizer state", state, f"AdamW: 2 moments in {param_dtype} (the parameter dtype){shard}"))
    return terms


def optimizer_phase(shape: ModelShape, precision: Precision, training: Training) -> Phase | None:
    """The foreach AdamW's temporary (module docstring); None for the fused AdamW and SGD."""
    if training.optimizer != "adamw":
        return None
    trainable = shape.adapter_params if training.lora else shape.total_params
    param_dtype = "float32" if training.lora else precision.weights
    size = _split(trainable * BYTES[param_dtype], training.shards)
    return Phase(OPTIMIZER_STEP, (Term("AdamW update temporary", size),))


def feature_term(shape: ModelShape, precision: Precision, training: Training) -> Term:
    if not training.feature_copy:
        return Term("frozen feature network", 0, "the policy's base weights under disable_adapter (no copy)")
    params = feature_network_params(shape, training.feature_depth)
    return Term(
        "frozen feature network",
        params * BYTES[precision.features],
        f"copy of layers 1-{training.feature_depth} of {shape.layers}, {count(params)} params, {precision.features}",
    )


def _working_set(shape: ModelShape) -> int:
    """Values a token of one layer's no-grad forward holds at once: h + q + 2 kv + 2 I."""
    return shape.hidden + shape.q_width + 2 * shape.kv_width + 2 * shape.intermediate


def _saved_per_layer(shape: ModelShape) -> int:
    """Values a token that one layer's forward keeps for backward: 4h + 4q + 4kv + 4I (module docstring)."""
    return 4 * (shape.hidden + shape.q_width + shape.kv_width + shape.intermediate)


def generation_phase(
    shape: ModelShape, precision: Precision, training: Training, work: Workload, gathered: int = 0
) -> Phase | None:
    """KV cache and one decoding step's logits (None when rollouts come from elsewhere, e.g. vLLM).
    ``gathered``: bytes of weights FSDP gathers for the duration of the rollouts."""
    if work.cache_positions == 0:
        return None
    b = BYTES[precision.compute]
    terms = [
        Term("KV cache", work.cache_positions * shape.attention_layers * 2 * shape.kv_width * b),
        Term("decoding logits", work.decode_rows * shape.vocab * (b + 4)),
        Term("prefill layer", work.prefill_tokens * _working_set(shape) * b),
    ]
    merges = precision.weights == precision.compute == "float32" and precision.quantised_bits is None
    if work.merged_sampling and training.lora and merges and training.shards == 1:
        terms.append(Term("merged adapter weights", shape.linear_params * 4, "adapted matrices + s B A, sampling"))
    if gathered:
        terms.append(Term("gathered weights (FSDP2)", gathered))
    return Phase("generation", tuple(terms))


def feature_phase(
    shape: ModelShape, precision: Precision, training: Training, work: Workload, gathered: int = 0
) -> Phase:
    """The feature network's forward (no grad). ``gathered``: as in ``generation_phase``."""
    b = BYTES[precision.compute]
    terms = [
        Term("captured hidden states", training.feature_layers * work.feature_tokens * shape.hidden * (b + 4)),
        Term("one layer", work.feature_tokens * _working_set(shape) * b),
    ]
    if gathered:
        terms.append(Term("gathered weights (FSDP2)", gathered))
    return Phase("feature pass", tuple(terms))


def policy_phase(shape: ModelShape, precision: Precision, training: Training, work: Workload) -> Phase:
    b = BYTES[precision.compute]
    one_layer = work.policy_tokens * _saved_per_layer(shape) * b
    if training.checkpointing:
        terms = [
            Term("checkpointed layer inputs", shape.layers * work.policy_tokens * shape.hidden * b),
            Term("one layer recomputed", one_layer),
        ]
    else:
        terms = [Term("saved activations", shape.layers * one_layer)]
    rows = min(work.logprob_rows, max(CHUNK_ELEMENTS // shape.vocab, 1))
    terms.append(Term("log-prob chunk", LOGPROB_CHUNK_TENSORS * rows * shape.vocab * 4))
    if not training.lora and precision.weights == "float32" and precision.compute == "bfloat16":
        terms.append(Term("bf16 weight copies (autocast)", _split(shape.total_params * 2, training.shards)))
    return Phase("policy pass", tuple(terms))


def plan_devices(
    shape: ModelShape,
    precision: Precision,
    training: Training,
    work: Workload,
    *,
    policy_device: str,
    feature_device: str,
    capacities: dict[str, int | None],
) -> list[DevicePlan]:
    """One plan per device of a process: the policy's, and the feature network's when it is another one."""
    state = state_terms(shape, precision, training)
    features = feature_term(shape, precision, training)
    # FSDP2 gathers the whole policy on every process for the rollouts and the feature scoring.
    whole = weight_bytes(shape, precision, Training(training.lora, training.optimizer, training.checkpointing))
    gathered = sum(whole) - sum(weight_bytes(shape, precision, training))
    phases = [policy_phase(shape, precision, training, work)]
    generation = generation_phase(shape, precision, training, work, gathered)
    if generation is not None:
        phases.insert(0, generation)
    step = optimizer_phase(shape, precision, training)
    if step is not None:
        phases.append(step)
    runtime = _runtime(policy_device)
    if feature_device == policy_device:
        phases.insert(
            len(phases) - (2 if step is not None else 1), feature_phase(shape, precision, training, work, gathered)
        )
        return [
            DevicePlan(
                policy_device,
                "policy and feature network",
                (*state, features, *runtime),
                tuple(phases),
                capacities.get(policy_device),
            )
        ]
    moved = Term(features.label, 0, f"on {feature_device}")
    return [
        DevicePlan(policy_device, "policy", (*state, moved, *runtime), tuple(phases), capacities.get(policy_device)),
        DevicePlan(
            feature_device,
            "feature network",
            (features, *_runtime(feature_device)),
            (feature_phase(shape, precision, training, work),),
            capacities.get(feature_device),
        ),
    ]


def _runtime(device: str) -> tuple[Term, ...]:
    return (Term("CUDA context", CUDA_CONTEXT, "typical"),) if device.startswith("cuda") else ()


def _split(value: int | float, shards: int) -> int:
    return int(math.ceil(value / shards))


def count(params: int) -> str:
    """A parameter count for people: 8.03B, 135.00M, 311.87k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if params >= size:
            return f"{params / size:.2f}{unit}"
    return str(params)


def gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def verdict(plan: DevicePlan) -> str:
    """'fits, X GiB left' / 'does not fit by X GiB' / '' when the device's memory is unknown."""
    if plan.headroom is None:
        return ""
    return f"fits, {gib(plan.headroom)} left" if plan.headroom >= 0 else f"does not fit by {gib(-plan.headroom)}"


def render(plans: list[DevicePlan]) -> list[str]:
    """Lines for the log: per device each term, the activation phase that peaks with its terms, the
    optimizer step's temporary, the total, and against the device's memory whether it fits (and what is
    left) or by how much it does not."""
    lines = []
    for plan in plans:
        memory = gib(plan.capacity) if plan.capacity is not None else "memory unknown"
        lines.append(f"{plan.device}, {plan.role} ({memory}):")
        for term in plan.terms:
            lines.append(f"  {term.label:<23}{gib(term.bytes):>11}  {term.note}".rstrip())
        peak = plan.activation_phase
        if peak is not None:
            lines.append(f"  {'activations':<23}{gib(peak.bytes):>11}  largest phase: {peak.name}")
            lines.append("    " + ", ".join(f"{t.label} {gib(t.bytes)}" for t in peak.terms))
        for phase in (p for p in plan.phases if p.name == OPTIMIZER_STEP):
            lines.append(f"  {phase.name:<23}{gib(phase.bytes):>11}  {phase.largest.label}, not during activations")
        lines.append(f"  {'total':<23}{gib(plan.total):>11}  {verdict(plan)}".rstrip())
    return lines
