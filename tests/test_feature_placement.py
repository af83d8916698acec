"""Where the frozen feature network runs: the placement rule (axolotl's, with the GPU count passed in or
mocked where it is read), a frozen copy on another device computing exactly the features of the shared
network, and real CPU runs of both modes with ``ebft.feature_device: cpu``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_texts

from ebft.attention.packed import pack
from ebft.attention.strided import build_plan
from ebft.attention.strided_layout import build_layout
from ebft.cli import main
from ebft.config import parse_config
from ebft.modeling.feature_network import FeatureNetwork, feature_placement, plan_on
from ebft.modeling.policy import load_policy
from ebft.modeling.tokenizer import load_tokenizer

CPU = torch.device("cpu")
# Another device object for the same memory: FeatureNetwork compares devices, so a network placed on
# "cpu:0" takes the path of a network on another device (a frozen copy, inputs moved, features moved back)
# while everything still runs on this CPU.
OTHER_CPU = torch.device("cpu", 0)


@pytest.mark.parametrize(
    ("setting", "policy", "processes", "gpus", "expected"),
    [
        (None, "cuda:0", 1, 2, "cuda:1"),  # axolotl: actor on GPU 0, feature network on GPU 1
        (None, "cuda:1", 1, 2, "cuda:0"),  # the next visible GPU, wrapping around: (1 + 1) % 2
        (None, "cuda:2", 1, 4, "cuda:3"),
        (None, "cuda:0", 1, 1, "cuda:0"),  # one GPU: shared device
        (None, "cuda:0", 2, 2, "cuda:0"),  # several processes: the next GPU is another process's
        (None, "cpu", 1, 0, "cpu"),
        ("cpu", "cuda:0", 1, 2, "cpu"),  # the setting wins (the 8B example's offload)
        ("cuda", "cuda:1", 1, 2, "cuda:1"),  # "cuda" is the current GPU: the policy's
        ("cuda:0", "cuda:1", 2, 2, "cuda:0"),
    ],
)
def test_placement_rule(setting, policy, processes, gpus, expected):
    got = feature_placement(setting, torch.device(policy), processes=processes, gpus=gpus)
    assert got == torch.device(expected)


@pytest.fixture(scope="module")
def lora_policy(tiny_model_dir):
    """The tiny model with a LoRA adapter whose B matrices are non-zero, so adapters change the output."""
    cfg = parse_config(
        {
            "base_model": str(tiny_model_dir),
            "rl": "ebft",
            "ebft": {"mode": "strided"},
            "datasets": [{"path": "unused.jsonl", "type": "ebft_pretrain.transform"}],
            "adapter": "lora",
            "lora_r": 4,
            "lora_target_linear": True,
            "bf16": False,
        }
    )
    policy = load_policy(cfg, load_tokenizer(cfg), CPU)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return policy


def _inputs(vocab: int):
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    return ids, torch.arange(40).expand(2, -1)


def test_lora_copy_on_another_device_equals_the_shared_network(lora_policy, caplog):
    """The copy holds the base layers without the adapters, so its features are the shared network's (the
    policy under disable_adapter) exactly: plain rows, packed rows and strided rows (whose plan is rebuilt
    for the copy's device). The policy's own output with its adapters differs."""
    layers = [0, 2, 3]
    shared = FeatureNetwork(lora_policy, layers)
    copy = FeatureNetwork(lora_policy, layers, device=OTHER_CPU)
    assert shared.shared and not copy.shared
    assert shared.parameter_bytes == 0 and copy.parameter_bytes > 0
    assert not any("lora" in name for name, _ in copy.body.named_parameters())
    ids, pos = _inputs(300)
    with caplog.at_level(logging.INFO, logger="ebft"):
        for got, want in zip(copy(ids, pos), shared(ids, pos), strict=True):
            assert torch.equal(got, want)
        copy(ids, pos)
    stated = [r.getMessage() for r in caplog.records if "moves its token ids" in r.getMessage()]
    assert len(stated) == 1 and "MiB out" in stated[0]  # the transfer cost, once

    row = pack([ids[0, :30].tolist(), ids[0, :20].tolist() + ids[1, :15].tolist()])
    for got, want in zip(copy(row.ids, row.positions, row.plan), shared(row.ids, row.positions, row.plan), strict=True):
        assert torch.equal(got, want)

    layout = build_layout(
        torch.tensor([40, 33]),
        torch.tensor([-1, -1]),
        40,
        stride=8,
        context_length=8,
        gen_len=4,
        min_completion_prefix=0,
        n=2,
    )
    packed = torch.randint(0, 300, (2, layout.total_len), generator=torch.Generator().manual_seed(1))
    plan = build_plan(layout)
    assert plan_on(plan, CPU) is plan and plan_on(plan, OTHER_CPU) is not plan
    positions = layout.position_ids()
    for got, want in zip(copy(packed, positions, plan), shared(packed, positions, plan), strict=True):
        assert torch.equal(got, want)
    with torch.no_grad():
        adapted = lora_policy.model.model(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
    assert not torch.allclose(adapted[3], shared(ids, pos)[2])


def test_a_copy_on_another_device_returns_features_on_the_policy_device(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    network = FeatureNetwork(policy, [1, 4], device=OTHER_CPU, dtype=torch.bfloat16)
    assert network.device == OTHER_CPU and network.home == CPU
    assert {p.dtype for p in network.body.parameters()} == {torch.bfloat16}
    assert "frozen copy of the first 4 layers on cpu:0, bfloat16" in network.placement()
    ids, pos = _inputs(300)
    out = network(ids, pos)
    assert [(h.dtype, h.device) for h in out] == [(torch.float32, CPU)] * 2


def test_validate_places_the_feature_network_on_the_second_of_two_mocked_gpus(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """No --gpus: the plan asks the machine how many GPUs it sees (mocked here, at that boundary, with their
    memory) and places the feature network as training would."""
    import ebft.train.memory as memory

    monkeypatch.setattr(memory, "visible_cuda_devices", lambda: 2)
    monkeypatch.setattr(memory, "cuda_memory", lambda index: 80 * 2**30)
    monkeypatch.setenv("COLUMNS", "250")  # the log's console: one line per plan line
    config = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided"},
        "datasets": [{"path": "unused.jsonl", "type": "ebft_pretrain.transform"}],
        "sequence_len": 256,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "cuda:0, policy (80.00 GiB):" in err and "cuda:1, feature network (80.00 GiB):" in err
    assert main(["validate", str(path), "--processes", "2"]) == 0
    err = capsys.readouterr().err
    assert "cuda:0, policy and feature network (80.00 GiB):" in err and "cuda:1" not in err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("placement-data")
    text = folder / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(8)), encoding="utf-8")
    pairs = []
    for t in stdlib_texts(24):
        lines = [line for line in t.splitlines() if line.strip()]
        if len(lines) >= 6:
            pairs.append({"input": lines[0][:50], "output": "\n".join(lines[1:4])[:120]})
    qa = folder / "pairs.jsonl"
    qa.write_text("".join(json.dumps(p) + "\n" for p in pairs[:8]), encoding="utf-8")
    return text, qa


@pytest.mark.parametrize("mode", ["strided", "structured"])
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_feature_device_cpu_trains_both_modes(tmp_path, tiny_model_dir, data, mode, adapter, capsys, monkeypatch):
    """``feature_device: cpu`` (the 8B example's offload) trains both modes on this CPU, and the log states
    the placement."""
    config = {
        "base_model": str(tiny_model_dir),
        "rl": "ebft",
        "sequence_len": 64,
        "max_steps": 1,
        "learning_rate": 1e-4,
        "bf16": False,
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        "adapter": adapter,
    }
    if adapter:
        config |= {"lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
    if mode == "strided":
        config["ebft"] = {"mode": "strided", "n_samples_per_prompt": 2, "feature_device": "cpu"}
        config["datasets"] = [{"path": str(data[0]), "type": "ebft_pretrain.transform"}]
    else:
        config["ebft"] = {"mode": "structured", "feature_device": "cpu"}
        config["trl"] = {"num_generations": 2, "max_completion_length": 8}
        config["micro_batch_size"] = 2
        config["datasets"] = [{"path": str(data[1]), "type": "ebft_opencode.transform"}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["train", str(path)]) == 0
    placement = [line for line in capsys.readouterr().err.splitlines() if "feature network: " in line]
    expected = "the policy's base weights under disable_adapter on cpu" if adapter else "frozen copy of the first"
    assert len(placement) == 1 and expected in placement[0]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(v == v for v in metrics[-1].values())  # logged and finite (NaN != NaN)
