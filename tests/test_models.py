"""The frozen feature network shares the policy's layers under LoRA; using it must leave the policy as
it was (train mode, so dropout and gradient checkpointing stay on)."""

from __future__ import annotations

import torch

from ebft.config import parse_config
from ebft.models import feature_network_for, load_policy, load_tokenizer


def _lora_config(model_dir) -> object:
    return parse_config(
        {
            "base_model": str(model_dir),
            "rl": "ebft",
            "ebft": {"mode": "strided", "feature_layers": [0.25, 0.5]},
            "datasets": [{"path": "unused.jsonl"}],
            "adapter": "lora",
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.5,
            "lora_target_linear": True,
            "gradient_checkpointing": True,
            "bf16": False,
        }
    )


def test_feature_pass_leaves_every_policy_module_in_its_mode(tiny_model_dir):
    cfg = _lora_config(tiny_model_dir)
    policy = load_policy(cfg, load_tokenizer(cfg), torch.device("cpu"))
    # Built while the freshly loaded policy is in eval mode (as the trainer does), trained afterwards:
    # the feature network's view of the shared layers then holds a stale eval flag of its own.
    features = feature_network_for(cfg, policy, torch.device("cpu"))
    policy.train()
    before = {name: m.training for name, m in policy.named_modules()}
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    features(ids, torch.arange(24).expand(2, -1))
    assert {name: m.training for name, m in policy.named_modules()} == before
    assert all(before.values())
    # Behaviour, not only flags: LoRA dropout (p = 0.5) still draws a new mask on every training forward
    # (lora_B starts at zero, where dropout would not show).
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
        first, second = (policy(ids).logits for _ in range(2))
    assert not torch.allclose(first, second)
