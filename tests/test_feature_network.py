"""The frozen feature network returns plain (graph-free) hidden states equal to output_hidden_states."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ebft.modeling.feature_network import FeatureNetwork
from ebft.modeling.policy import prepare_policy


def test_features_need_no_grad_with_gradient_checkpointing_and_equal_hidden_states():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    cfg = SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs=None, adapter=None)
    policy = prepare_policy(LlamaForCausalLM(config), cfg, torch.device("cpu"))
    policy.train()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    # Layer 0 is the embedding output, which transformers' checkpointing hook marks requires_grad.
    got = FeatureNetwork(policy, [0, 1, 2])(ids, torch.arange(9).expand(2, -1))
    policy.eval()
    with torch.no_grad():
        want = policy.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert [h.requires_grad for h in got] == [False, False, False]
    for layer, h in zip([0, 1, 2], got, strict=True):
        assert torch.allclose(h, want[layer], atol=1e-6), layer
