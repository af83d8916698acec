"""The frozen feature network shares the policy's layers under LoRA; using it must leave the policy as
it was (train mode, so dropout and gradient checkpointing stay on)."""

from __future__ import annotations

from functools import partial

import torch

from ebft.config import parse_config
from ebft.modeling.feature_network import feature_network_for
from ebft.modeling.policy import load_policy
from ebft.modeling.tokenizer import load_tokenizer


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


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_gradient_checkpointing_keeps_activations_out_of_every_strided_step(tiny_model_dir):
    """With gradient checkpointing the policy pass saves only each layer's input, in every step, not
    only until the first feature pass (which used to switch the shared layers to eval mode)."""
    from ebft.data.collate import collate_documents
    from ebft.strided.step import StridedSettings, count_targets, document_generators, strided_microbatch

    gen = torch.Generator().manual_seed(3)
    rows = [{"input_ids": t, "labels": t} for t in torch.randint(5, 300, (2, 48), generator=gen).tolist()]
    saved = {}
    for checkpointing in (False, True):
        cfg = _lora_config(tiny_model_dir).model_copy(
            update={"gradient_checkpointing": checkpointing, "lora_dropout": 0.0}
        )
        tok = load_tokenizer(cfg)
        policy = load_policy(cfg, tok, torch.device("cpu"))
        features = feature_network_for(cfg, policy, torch.device("cpu"))
        policy.train()
        s = StridedSettings.from_config(cfg.ebft.model_copy(update={"stride": 4, "context_length": 4}))
        per_step = []
        for step, row in enumerate(rows):
            batch = collate_documents([row], tok.pad_token_id)
            gens = document_generators(0, step, 0, 1, "cpu")
            step_fn = partial(strided_microbatch, policy, features, batch, s, count_targets(batch, s), generators=gens)
            per_step.append(_saved_bytes(step_fn))
        saved[checkpointing] = per_step
    # Measured: 13.3 MB saved per step without checkpointing, 0.56 MB with it; 7.0 MB when the feature
    # pass (layers 1-2 of 4) left its layers in eval mode, which turns their checkpointing off.
    assert all(with_gc < without / 4 for with_gc, without in zip(saved[True], saved[False], strict=True)), saved
