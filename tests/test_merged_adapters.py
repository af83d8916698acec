"""Sampling through merged LoRA weights (``ebft.modeling.merged_adapters``): the same linear map, the base weights
untouched afterwards, and the cases that keep the adapters unmerged."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from strided_builders import random_model

from ebft.modeling.merged_adapters import merge_reason, merged_for_sampling


def _policy(**lora) -> torch.nn.Module:
    model = random_model(vocab=97)
    with torch.no_grad():  # non-unit norm weights, so that a merge that skipped a norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    with torch.no_grad():  # B starts at zero: give the adapters an effect to merge
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy.eval()


def _snapshot(model) -> dict[str, tuple[int, torch.Tensor, bool]]:
    return {n: (p.data_ptr(), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def test_merged_weights_compute_the_adapted_model_and_leave_the_base_as_it_was():
    policy = _policy()
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
    before = _snapshot(policy)
    assert merge_reason(policy) is None
    with torch.no_grad(), merged_for_sampling(policy) as merged:
        assert merged
        got = policy(input_ids=ids).logits
        q = policy.base_model.model.model.layers[0].self_attn.q_proj
        assert q.disable_adapters  # one product per layer: the adapters are off, W + s B A carries them
    # The oracle is the unmerged model's own forward: the same map up to fp32 rounding, far from the base's.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-2
    after = _snapshot(policy)
    for name, (ptr, value, grad) in before.items():
        assert after[name][0] == ptr, name  # the very tensor is back, not a copy
        assert torch.equal(after[name][1], value), name
        assert after[name][2] == grad, name
    assert not q.disable_adapters


def test_an_error_inside_restores_the_base_weights():
    policy = _policy()
    before = _snapshot(policy)
    with pytest.raises(RuntimeError, match="boom"), merged_for_sampling(policy):
        raise RuntimeError("boom")
    after = _snapshot(policy)
    assert all(after[n][0] == before[n][0] and torch.equal(after[n][1], before[n][1]) for n in before)


@pytest.mark.parametrize(
    ("lora", "autocast", "dtype", "reason"),
    [
        ({}, torch.bfloat16, torch.float32, "autocast"),
        ({}, None, torch.bfloat16, "bfloat16 base weights"),
        ({"use_dora": True}, None, torch.float32, "variant"),
        ({"modules_to_save": ["lm_head"]}, None, torch.float32, "modules_to_save"),
        ({"trainable_token_indices": [1, 2]}, None, torch.float32, "trainable_token_indices"),
    ],
)
def test_cases_that_sample_through_the_adapters_unmerged(lora, autocast, dtype, reason):
    policy = _policy(**lora)
    if dtype != torch.float32:
        for layer in policy.modules():
            if hasattr(layer, "base_layer"):
                layer.base_layer.to(dtype)
    assert reason in merge_reason(policy, autocast)
    before = _snapshot(policy)
    with merged_for_sampling(policy, autocast) as merged:
        assert not merged
        assert not policy.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters
    assert all(torch.equal(p, before[n][1]) for n, p in policy.named_parameters())


def test_a_model_without_adapters_is_left_alone():
    model = _policy().get_base_model()
    assert merge_reason(model) == "not a PEFT model"
    with merged_for_sampling(model) as merged:
        assert not merged


def test_rollouts_sample_through_the_merged_weights_and_draw_what_the_adapters_draw():
    from ebft.structured.hf import HFGenerate
    from ebft.structured.rollout import Sampling

    policy = _policy().train()
    q = policy.base_model.model.model.layers[0].self_attn.q_proj
    states: list[bool] = []
    q.register_forward_pre_hook(lambda module, args: states.append(module.disable_adapters))
    sampler = HFGenerate(policy, sampling=Sampling(1.0, top_k=20), pad_token_id=0)
    prompts, caps, seeds = [[5, 17, 3], [40, 2]], [12, 9], [7, 8]
    got = sampler.generate(prompts, 3, caps, seeds)
    assert states and all(states)  # every model call ran with W + s B A and the adapters off
    assert policy.training and not q.disable_adapters  # the policy is handed back as it came
    # The oracle: the same sampler, called below generate's merge, runs through the adapters unmerged.
    states.clear()
    policy.eval()
    with torch.no_grad():
        want = sampler._generate(prompts, 3, caps, seeds, torch.device("cpu"))
    assert states and not any(states)
    assert [[c.ids for c in group] for group in got] == [[c.ids for c in group] for group in want]
