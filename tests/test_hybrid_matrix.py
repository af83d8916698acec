"""The structured-mode architecture matrix (docs/design.md §7.2): one structured training step on a tiny model of every
family, hybrid and recurrent ones (Qwen3.5, Qwen3-Next, Granite 4, LFM2, Falcon-H1, Jamba, Bamba, Nemotron-H,
Mamba, Mamba-2, RecurrentGemma) and the attention families of the strided oracle, checked piece by piece
against independent per-sequence plain forwards:

* rollouts: drawn by the automatic path (the shared-prefill decoder for all of these), the very draws of
  transformers ``generate`` for the same seeds;
* features and rewards: hidden states 1..3 of 4 (the truncated feature network, whose body still ends in
  its final norm) from each sequence's own ``output_hidden_states`` of the base model, with non-unit norm
  weights, pooled and rewarded by hand;
* loss and LoRA gradient: the on-policy GRPO surrogate from each completion's own forward through the
  adapted policy (LoRA from ``lora_target_linear``, with non-zero B so that the adapter changes the policy);
* the packed path is never taken for a model with a layer that is not full attention.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hybrid_models import FAMILIES, HYBRID, build_family, hidden_states
from structured_builders import structured_settings

from ebft import features as feat
from ebft import losses
from ebft.attention import packed as packing
from ebft.attention.packed import unsupported_reason
from ebft.data.structured import PromptRow
from ebft.modeling.adapters import add_adapter
from ebft.modeling.feature_network import FeatureNetwork
from ebft.modeling.parts import backbone_of, output_head
from ebft.structured.forward import use_packed
from ebft.structured.hf import HFGenerate
from ebft.structured.rollout import Sampling
from ebft.structured.scoring import score
from ebft.structured.settings import StructuredSettings
from ebft.structured.step import RolloutBuffer, microbatch, roll_out

ATOL = 1e-5
FRACTIONS = [0.25, 0.5, 0.75]  # int(f * 4) = 1, 2, 3 (int(f * 3) = 0, 1, 2): all below the final norm
G = 3
# Token 2 is EOS; 7 and 11 stop too, so completions end at different lengths and rows leave the decoder.
STOPS = (2, 7, 11)
CAP = 6
TOKENIZER = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: " ".join(map(str, ids)))


def _settings() -> StructuredSettings:
    return structured_settings(
        None,
        num_generations=G,
        max_completion_length=CAP,
        sampling=Sampling(temperature=1.0, stop_token_ids=STOPS),
        sequence_len=64,
    )


def _rows() -> list[PromptRow]:
    """Two prompts of different lengths (the decoder's prefill left-pads the shorter one)."""
    return [
        PromptRow("p0", "g0", (), (1, 5, 9, 14, 3, 22, 40), (33, 34, 35, 36), "test"),
        PromptRow("p1", "g1", (), (1, 30, 17), (48, 49, 50), "test"),
    ]


def _lora_policy(name: str):
    """The family's tiny model under a LoRA of every linear layer PEFT accepts, B drawn at random."""
    cfg = SimpleNamespace(
        lora_model_dir=None, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True, lora_target_modules=None
    )
    policy = add_adapter(cfg, build_family(name))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for path, p in policy.named_parameters():
            if "lora_B" in path:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return policy


def _pooled(states: list[torch.Tensor], layers: list[int]) -> torch.Tensor:
    """per_layer feature norm, then last_token pooling, from one sequence's hidden states."""
    return torch.cat([torch.nn.functional.normalize(states[k][-1], dim=-1) for k in layers])


def _oracle_scores(reference, rows, samples, layers):
    """alignment and diversity of every completion from each sequence's own forward (float64)."""
    P = len(rows)
    gen = torch.stack([_pooled(hidden_states(reference, q.sequence[: q.feature_length]), layers) for q in samples])
    gt = torch.stack([_pooled(hidden_states(reference, list(r.prompt_ids) + list(r.gt_ids)), layers) for r in rows])
    phi = torch.nn.functional.normalize(gen, dim=-1).reshape(P, G, -1)
    phi_gt = torch.nn.functional.normalize(gt, dim=-1)
    alignment = torch.zeros(P, G, dtype=torch.float64)
    diversity = torch.zeros(P, G, dtype=torch.float64)
    for p in range(P):
        for j in range(G):
            alignment[p, j] = 2 * torch.dot(phi[p, j], phi_gt[p])  # 2 cos: both are unit vectors
            diversity[p, j] = 2 / (G - 1) * sum(torch.dot(phi[p, j], phi[p, k]) for k in range(G) if k != j)
    return alignment, diversity


def _oracle_loss(policy, samples, advantage):
    """GRPO on-policy: -(1/N) sum_i A_i mean_t logp_it, each completion forwarded alone (unpadded)."""
    total = 0.0
    for q, a in zip(samples, advantage.tolist(), strict=True):
        ids = torch.tensor([q.sequence])
        logp = policy(input_ids=ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        total = total - a * logp[torch.tensor(q.loss_mask[1:])].mean() / len(samples)
    return total


@pytest.mark.parametrize("name", FAMILIES)
def test_one_structured_step_equals_per_sequence_forwards(name, monkeypatch):
    s = _settings()
    rows = _rows()
    policy = _lora_policy(name)
    reference = build_family(name)  # the same base weights, never adapted: the feature network's oracle
    N = reference.config.num_hidden_layers

    # The packed path is never taken for models with any layer that is not full attention.
    if name in HYBRID:

        def no_packing(*args, **kwargs):
            raise AssertionError("packed row built for a model that must run padded")

        monkeypatch.setattr(packing, "pack", no_packing)

    # Rollouts: the automatic path is the shared-prefill decoder, and it draws what generate draws.
    backend = HFGenerate(policy, sampling=s.sampling, pad_token_id=0)
    assert backend.shared_prefill
    samples = roll_out(backend, rows, s, TOKENIZER, [3, 4])
    reference_backend = HFGenerate(policy, sampling=s.sampling, pad_token_id=0, shared_prefill=False)
    assert [q.sequence for q in roll_out(reference_backend, rows, s, TOKENIZER, [3, 4])] == [
        q.sequence for q in samples
    ]
    assert len({len(q.sequence) for q in samples}) >= 2  # completions of different lengths

    # Features and rewards.
    layers = feat.layer_indices(FRACTIONS, N)
    assert max(layers) < N
    scores = score(FeatureNetwork(policy, layers), rows, samples, s, 0, batch_size=4)
    alignment, diversity = _oracle_scores(reference, rows, samples, layers)
    torch.testing.assert_close(scores.alignment.double(), alignment, atol=ATOL, rtol=0)
    torch.testing.assert_close(scores.diversity.double(), diversity, atol=ATOL, rtol=0)
    torch.testing.assert_close(scores.reward.double(), alignment - diversity, atol=2 * ATOL, rtol=0)

    # Loss and LoRA gradient: one micro-batch per prompt, step-global norms.
    advantage = scores.advantage.reshape(-1)
    assert float(advantage.abs().max()) > 0.1
    buffer = RolloutBuffer(rows, samples, scores, advantage, 0)
    norm = losses.LossNorm(
        sequences=len(samples),
        tokens=sum(sum(q.loss_mask[1:]) for q in samples),
        max_completion_length=CAP,
        micro_batches=2,
    )
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    assert params and all("lora_" in n for n, _ in named)
    policy.train()
    parts = [
        microbatch(policy, buffer, list(range(p * G, p * G + G)), [], s, norm, 0, TOKENIZER, pad_id=0) for p in (0, 1)
    ]
    policy.eval()
    want_loss = _oracle_loss(policy, samples, advantage)
    want_grads = torch.autograd.grad(want_loss, params, allow_unused=True)
    # Mamba-1 and Jamba mixers multiply by dt_proj.weight instead of calling dt_proj: PEFT adapts it, the
    # adapter never acts and gets no gradient, on either side.
    unused = {n.split(".lora_")[0].rsplit(".", 1)[-1] for (n, p), g in zip(named, want_grads, strict=True) if g is None}
    assert unused == ({"dt_proj"} if name in ("mamba", "jamba") else set())
    assert all(p.grad is None for p, g in zip(params, want_grads, strict=True) if g is None)
    got = torch.cat([p.grad.reshape(-1) for p, g in zip(params, want_grads, strict=True) if g is not None])
    want = torch.cat([g.reshape(-1) for g in want_grads if g is not None])
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # On-policy every ratio is 1: the step's loss is -(1/N) sum_i A_i = -mean(A), 0 for centred groups.
    assert sum(p.loss for p in parts) == pytest.approx(float(-advantage.mean()), abs=1e-6)
    if name in HYBRID:  # ... and the log says why: the layers, not the attention implementation
        assert not use_packed(policy)
        assert unsupported_reason(policy.config).startswith("layers that are not attention")


@pytest.mark.parametrize("name", FAMILIES)
def test_feature_layers_from_embeddings_to_final_norm(name):
    """Hidden states 0 (the embedding output), every layer, and num_layers (after the final norm) of a whole
    and of a truncated feature network equal the model's own, norm weights non-unit."""
    model = build_family(name)
    N = model.config.num_hidden_layers
    seqs = [[1, 5, 9, 14, 3, 22, 40, 8], [1, 30, 17, 4, 5]]
    ids = torch.zeros(2, 8, dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, : len(q)] = torch.tensor(q)
    positions = torch.arange(8).expand(2, -1)
    for layers in (list(range(N + 1)), [0, N - 1]):
        got = FeatureNetwork(model, layers)(ids, positions)
        for i, q in enumerate(seqs):
            want = hidden_states(model, q)
            for k, h in zip(layers, got, strict=True):
                torch.testing.assert_close(h[i, : len(q)].double(), want[k], atol=ATOL, rtol=0, msg=f"layer {k}")


@pytest.mark.parametrize("name", FAMILIES)
def test_output_head_gives_the_models_own_logits(name):
    """The policy's log-probs come from body + ``output_head``: with Falcon-H1's lm_head_multiplier,
    RecurrentGemma's logits_soft_cap, Granite's logits_scaling, ... that is the model's own logits."""
    model = build_family(name)
    ids = torch.tensor([[1, 5, 9, 14, 3, 22, 40, 8]])
    with torch.no_grad():
        got = output_head(model)(backbone_of(model)(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(got.float(), model(ids).logits.float(), atol=ATOL, rtol=0)


def test_no_model_with_a_layer_that_is_not_full_attention_runs_packed():
    """Over every causal LM type transformers knows: a default config that declares any layer type other
    than full attention keeps the model off the packed row, and the reason says what the layers are."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    checked = 0
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            config = AutoConfig.for_model(model_type)
        except Exception:  # configs that cannot be built without arguments declare nothing to check
            continue
        types = set(getattr(config.get_text_config(decoder=True), "layer_types", None) or [])
        if types - {"full_attention"}:
            reason = unsupported_reason(config)
            assert reason is not None, model_type
            if types - {"full_attention", "sliding_attention", "chunked_attention"}:
                assert reason.startswith("layers that are not attention"), (model_type, reason)
            checked += 1
    assert checked >= 30  # the hybrid and recurrent families above, and many sliding-window ones
