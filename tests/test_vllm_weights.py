"""Full-weight sync to vLLM (trl.vllm_lora_sync: false) against FakeVLLMServer, gloo standing in for NCCL.

What goes out (checkpoint names, LoRA merged, conversions reverted), the protocol (routes, chunks, two
workers), that rollouts after a sync come from the sent weights, and every failure: a server without the
routes, one without weight transfer, a rendezvous that times out, a transfer that fails mid-way."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_texts
from fake_vllm import FakeVLLMServer
from safetensors import safe_open
from safetensors.torch import load_file

from ebft.cli import main
from ebft.errors import ConfigError
from ebft.structured.rollout import Sampling
from ebft.vllm.client import VLLMClient, VLLMError, VLLMSyncError
from ebft.vllm.transport import GlooTransport, TransferError
from ebft.vllm.weight_source import plan_chunks, policy_entries
from ebft.vllm.weight_transfer import WeightTransfer
from ebft.vllm.weights import Collective, WeightSyncBackend

GREEDY = Sampling(temperature=0.0)
WEIGHT_ROUTES = ("/init_weight_transfer_engine", "/start_weight_update", "/update_weights", "/finish_weight_update")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with FakeVLLMServer(tiny_model_dir, workers=2) as fake:  # two workers: world size 3
        yield fake


@pytest.fixture
def fake(server):
    server.reset()
    yield server
    server.reset()


def _model(model_dir: Path, *, shift: float = 0.0, seed: int = 0):
    """The tiny model with every weight moved by a seeded random amount (a 'trained' policy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * shift)
    return model


def _lora(model_dir: Path, scale: float = 0.3):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def _backend(fake, *, timeout: float = 10.0, chunk_bytes: int = 60_000, interval: int = 1, **kwargs):
    client = VLLMClient(fake.host, fake.port, timeout=30.0, retries=1, backoff=0.01)
    transfer = WeightTransfer(
        client, lambda world: GlooTransport(world, timeout), chunk_bytes=chunk_bytes, timeout=timeout
    )
    return WeightSyncBackend(
        client,
        sampling=GREEDY,
        model_name=fake.served_model_name,
        sync_interval=interval,
        transfer=transfer,
        **kwargs,
    )


def _greedy(backend, prompts) -> list:
    return backend.generate(prompts, n=1, max_tokens=[8] * len(prompts), seeds=list(range(len(prompts))))


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer(t)["input_ids"] for t in ["def add(a, b):\n", "import os\nimport", "class P:\n    def"]]


# -- what is sent ------------------------------------------------------------------------------


def test_chunks_keep_the_order_and_the_bound():
    # 4+4 = 8 fits in 8; 8+4 does not; 10 alone exceeds 8 and goes alone; then 1+1 = 2.
    assert plan_chunks([4, 4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert plan_chunks([], 8) == []
    with pytest.raises(ValueError):
        plan_chunks([1], 0)


def test_a_plain_model_goes_out_as_its_checkpoint(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir, shift=0.01)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    entries = policy_entries(model, wire_dtype=None)
    sent = {spec.name: tensor for entry in entries for spec, tensor in zip(entry.specs, entry.tensors(), strict=True)}
    assert sent.keys() == saved.keys()  # the same names as the checkpoint (the tied head once)
    assert all(torch.equal(sent[name], saved[name]) for name in saved)
    in_bf16 = policy_entries(model, wire_dtype=torch.bfloat16)
    assert {spec.dtype for entry in in_bf16 for spec in entry.specs} == {torch.bfloat16}
    assert sum(entry.nbytes for entry in in_bf16) * 2 == sum(entry.nbytes for entry in entries)


def test_lora_goes_out_merged_and_leaves_the_base_weights_alone(tiny_model_dir):
    model = _lora(tiny_model_dir)
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    oracle = copy.deepcopy(model).merge_and_unload().state_dict()  # PEFT's own merge
    entries = policy_entries(model, wire_dtype=None)
    sent = {spec.name: tensor for entry in entries for spec, tensor in zip(entry.specs, entry.tensors(), strict=True)}
    assert set(sent) == set(oracle)  # the base model's names, no adapter weights
    for name, value in oracle.items():
        torch.testing.assert_close(sent[name], value, rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q], base_q)  # the adapter is in what was sent ...
    assert torch.equal(
        model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_q
    )  # ... not in W


def test_converted_weights_go_out_in_checkpoint_layout(tmp_path):
    """transformers fuses a Qwen3-MoE checkpoint's per-expert weights when loading; the server loads the
    checkpoint's layout, so the fused tensors are split back (what save_pretrained writes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    entries = policy_entries(model, wire_dtype=None)
    assert len(entries) < len(saved)  # fewer parameters than checkpoint tensors: experts are fused in memory
    sent = {spec.name: tensor for entry in entries for spec, tensor in zip(entry.specs, entry.tensors(), strict=True)}
    assert sent.keys() == saved.keys()
    assert all(torch.equal(sent[key], saved[key]) for key in saved)


# -- the protocol, and rollouts after a sync -----------------------------------------------------


def test_rollouts_after_a_sync_are_those_of_the_sent_weights(fake, tiny_model_dir, prompts, tmp_path):
    backend = _backend(fake)
    base = _greedy(backend, prompts)
    trained = _model(tiny_model_dir, shift=0.05)
    backend.sync(trained, 0)
    after = _greedy(backend, prompts)
    # Oracle: a server that loaded the trained weights from disk samples exactly the same completions.
    trained.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    with FakeVLLMServer(tmp_path) as oracle:
        assert _greedy(_backend(oracle), prompts) == after
    assert after != base
    served = fake.base.state_dict()
    assert all(torch.equal(served[name], value) for name, value in trained.state_dict().items())
    backend.close()


def test_one_update_is_start_chunks_finish_then_a_cache_reset(fake, tiny_model_dir):
    backend = _backend(fake, chunk_bytes=60_000)
    model = _model(tiny_model_dir, shift=0.01)
    backend.sync(model, 0)
    paths = [r.path for r in fake.requests]
    updates = fake.calls("/update_weights")
    assert paths == [
        "/get_world_size",
        "/init_weight_transfer_engine",
        "/start_weight_update",
        *["/update_weights"] * len(updates),
        "/finish_weight_update",
        "/reset_prefix_cache",
    ]
    init = fake.calls("/init_weight_transfer_engine")[0].body["init_info"]
    assert (init["rank_offset"], init["world_size"], init["packed"]) == (1, 3, False)
    entries = policy_entries(model, wire_dtype=None)
    expected = plan_chunks([entry.nbytes for entry in entries], 60_000)
    assert len(updates) == len(expected) > 1
    for call, chunk in zip(updates, expected, strict=True):
        info = call.body["update_info"]
        specs = [spec for i in chunk for spec in entries[i].specs]
        assert info == {
            "names": [s.name for s in specs],
            "dtype_names": ["float32"] * len(specs),
            "shapes": [list(s.shape) for s in specs],
        }
        assert sum(s.nbytes for s in specs) <= 60_000 or len(chunk) == 1
    assert fake.receiver.versions == ["step-0"]
    backend.close()


def test_every_due_sync_sends_every_weight_layer_after_layer(fake, tiny_model_dir):
    """Also LoRA's frozen weights: vLLM reloads checkpoint-format weights a whole layer at a time."""
    backend = _backend(fake, chunk_bytes=1 << 30, interval=2)
    model = _lora(tiny_model_dir)
    backend.sync(model, 0)
    backend.sync(model, 1)  # not due
    backend.sync(model, 2)
    in_module_order = [name for name, _ in _model(tiny_model_dir).named_parameters()]
    assert fake.receiver.updates == [in_module_order, in_module_order]
    assert fake.receiver.versions == ["step-0", "step-2"]
    backend.close()


def test_a_resumed_run_sends_everything_at_its_first_sync_whatever_the_interval(fake, tiny_model_dir):
    backend = _backend(fake, chunk_bytes=1 << 30, interval=4)
    backend.sync(_model(tiny_model_dir, shift=0.01), 6)
    assert fake.receiver.versions == ["step-6"] and len(fake.receiver.updates[0]) == 39


def test_no_rollout_runs_while_the_weights_change(fake, tiny_model_dir, prompts):
    """A rollout already under way (async prefetch) finishes first; none starts until the update is done."""
    backend = _backend(fake, chunk_bytes=20_000)
    model = _model(tiny_model_dir, shift=0.01)
    backend.sync(model, 0)
    fake.delay = 0.02  # every request, the weight routes too, takes a while: overlaps would show
    rollouts = threading.Thread(target=lambda: [_greedy(backend, prompts) for _ in range(3)])
    rollouts.start()
    time.sleep(0.05)
    backend.sync(model, 1)
    rollouts.join()
    statuses = [r.status for r in fake.calls("/v1/completions")]
    assert statuses == [200] * 9  # the fake answers 409 to a completion asked during an update
    backend.close()


# -- failures ------------------------------------------------------------------------------------


def test_a_server_without_weight_transfer_routes_says_how_to_start_it(tiny_model_dir):
    with FakeVLLMServer(tiny_model_dir, dev_mode=False) as fake:
        backend = _backend(fake)
        with pytest.raises(VLLMSyncError) as info:
            backend.sync(_model(tiny_model_dir), 0)
    message = str(info.value)
    assert "has no weight-transfer routes (GET /get_world_size answered 404)" in message
    assert "ebft vllm-serve CFG" in message and "VLLM_SERVER_DEV_MODE=1" in message
    assert "--weight-transfer-config" in message


def test_a_server_started_without_weight_transfer_says_how_to_start_it(tiny_model_dir):
    with FakeVLLMServer(tiny_model_dir, weight_transfer=False) as fake:
        backend = _backend(fake, timeout=2.0)
        with pytest.raises(VLLMSyncError) as info:
            backend.sync(_model(tiny_model_dir), 0)
        assert [r.path for r in fake.requests] == ["/get_world_size", "/init_weight_transfer_engine"]
    message = str(info.value)
    assert "refused to set up weight transfer" in message and "Weight transfer not configured" in message
    assert "--weight-transfer-config" in message


def test_a_rendezvous_that_never_completes_times_out(fake, tiny_model_dir):
    fake.receiver.stall_join = True  # the server answers init but never joins the group
    backend = _backend(fake, timeout=1.5)
    start = time.monotonic()
    with pytest.raises(VLLMSyncError, match=r"did not join the gloo weight-transfer group within 1.5s"):
        backend.sync(_model(tiny_model_dir), 0)
    assert time.monotonic() - start < 10
    assert fake.calls("/start_weight_update") == []  # nothing was changed on the server


def test_a_transfer_failing_midway_stops_every_later_rollout(fake, tiny_model_dir, prompts):
    backend = _backend(fake, timeout=2.0, chunk_bytes=60_000)
    fake.receiver.fail_after(5)  # the server loads 5 tensors, then fails (the trainer's next send times out)
    with pytest.raises(VLLMSyncError) as info:
        backend.sync(_model(tiny_model_dir, shift=0.05), 0)
    message = str(info.value)
    assert re.search(r"failed at chunk \d+/\d+: .*injected failure while loading model\.", message), message
    assert "partly updated" in message
    assert fake.calls("/finish_weight_update") == []
    with pytest.raises(VLLMError, match="did not finish"):
        _greedy(backend, prompts)
    assert fake.calls("/v1/completions") == []
    with pytest.raises(TransferError, match="failed earlier; restart the server"):
        backend.transfer.push([], "again")  # the group is gone; a new one needs a fresh server


def test_a_vocabulary_the_server_cannot_hold_is_refused_before_anything_is_sent(fake, tiny_model_dir):
    backend = _backend(fake, served_vocab_size=384)
    model = _model(tiny_model_dir)
    model.resize_token_embeddings(390)
    with pytest.raises(ConfigError, match="special_tokens: the policy's vocabulary has 390 tokens but the vLLM"):
        backend.sync(model, 0)
    assert fake.requests == []


def test_every_process_stops_when_the_main_process_sync_fails(fake, tiny_model_dir):
    """A second process never sends; it learns the main process's outcome through the collective."""
    shared = []
    follower = WeightSyncBackend(
        VLLMClient(fake.host, fake.port, timeout=5.0),
        sampling=GREEDY,
        model_name=fake.served_model_name,
        sync_interval=1,
        transfer=None,
        collective=Collective(barrier=lambda: shared.append("barrier"), share=lambda _mine: "server gone"),
    )
    with pytest.raises(VLLMSyncError, match="full-weight sync after step 0 failed: server gone"):
        follower.sync(_model(tiny_model_dir), 0)
    assert shared == ["barrier"] and fake.requests == []


def test_nccl_needs_the_trainer_on_a_gpu(fake, tmp_path, capsys):
    path = _training_config(fake, tmp_path, max_steps=1)
    assert main(["train", str(path), "--vllm.weight_transfer_backend=nccl"]) == 2
    err = capsys.readouterr().err
    assert "full-weight sync after step 0 failed" in err and "needs the trainer on a CUDA GPU with NCCL" in err
    assert fake.calls("/init_weight_transfer_engine") == []  # refused before the server was asked anything


def test_transport_needs_a_peer():
    with pytest.raises(ValueError):
        GlooTransport(1, 1.0)
    transport = GlooTransport(2, 0.5)
    transport.start()
    with pytest.raises(TransferError, match="did not join"):
        transport.joined()


# -- training through the CLI --------------------------------------------------------------------


def _training_config(fake, tmp_path: Path, *, max_steps: int, top: dict | None = None, **trl) -> Path:
    """A small structured full fine-tuning config whose rollouts come from ``fake``, weights synced by gloo."""
    data = tmp_path / "pairs.jsonl"
    rows = [{"input": t.splitlines()[0][:60], "output": "\n".join(t.splitlines()[1:6])[:200]} for t in stdlib_texts(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "base_model": fake.served_model_name,
        "rl": "ebft",
        "ebft": {"mode": "structured"},
        "trl": {
            "num_generations": 2,
            "max_completion_length": 8,
            "temperature": 1.0,
            "use_vllm": True,
            "vllm_server_port": fake.port,
            **trl,
        },
        "vllm": {"weight_transfer_backend": "gloo", "weight_transfer_timeout": 3.0, "weight_transfer_chunk_bytes": 1e5},
        "datasets": [{"path": str(data), "type": "ebft_opencode.transform"}],
        "sequence_len": 128,
        "micro_batch_size": 2,
        "max_steps": max_steps,
        "learning_rate": 1e-3,
        "bf16": False,
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        **(top or {}),
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _served_equals(fake, weights: dict[str, torch.Tensor]) -> bool:
    served = fake.base.state_dict()
    return served.keys() == weights.keys() and all(torch.equal(served[k], v) for k, v in weights.items())


def test_full_fine_tuning_samples_from_the_synced_policy(fake, tmp_path):
    path = _training_config(fake, tmp_path, max_steps=3, async_prefetch=True)
    assert main(["train", str(path)]) == 0
    # Before the first rollout, then after every step; each time every weight (all of them train).
    assert fake.receiver.versions == ["step-0", "step-1", "step-2", "step-3"]
    assert [len(names) for names in _per_transfer(fake)] == [39] * 4
    assert _served_equals(fake, load_file(tmp_path / "out" / "model.safetensors"))  # the final policy, exactly
    completions = fake.calls("/v1/completions")
    assert {c.body["model"] for c in completions} == {fake.served_model_name}
    assert all(c.status == 200 for c in completions)  # none while an update was open (409)


def _per_transfer(fake) -> list[list[str]]:
    """The names sent by each transfer (its update requests together)."""
    out, current = [], []
    for request in fake.requests:
        if request.path == "/update_weights":
            current += request.body["update_info"]["names"]
        elif request.path == "/finish_weight_update":
            out, current = [*out, current], []
    return out


def test_a_failed_sync_saves_the_policy_and_the_run_resumes_on_a_restarted_server(fake, tmp_path, capsys):
    path = _training_config(fake, tmp_path, max_steps=3)
    fake.receiver.fail_after(39 * 2 + 5)  # the transfers before the rollouts and after step 1 go through
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "full-weight sync after step 2 failed" in err and "injected failure while loading" in err
    assert "The policy after step 2 is saved in" in err and "--resume_from_checkpoint=latest" in err
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").is_file()
    fake.reset()  # the server is restarted: base weights, no group
    assert main(["train", str(path), "--resume_from_checkpoint=latest"]) == 0
    assert fake.receiver.versions == ["step-2", "step-3"]  # the restored policy first, whatever the interval
    assert [len(names) for names in _per_transfer(fake)] == [39, 39]
    assert _served_equals(fake, load_file(tmp_path / "out" / "model.safetensors"))
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]  # step 2 was logged before stopping


def test_two_sharded_processes_send_the_gathered_policy_once(fake, tmp_path):
    """FSDP2 over 2 processes: the shards are gathered for each sync, only the main process sends, and
    both processes sample from the server once the transfer is done."""
    path = _training_config(fake, tmp_path, max_steps=2, top={"fsdp_version": 2, "micro_batch_size": 2})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29587"]
    res = subprocess.run(
        [*command, "-m", "ebft", "train", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FSDP2: policy sharded over 2 processes" in res.stdout + res.stderr
    assert fake.receiver.versions == ["step-0", "step-1", "step-2"]  # one transfer per sync, not one per process
    assert [len(names) for names in _per_transfer(fake)] == [39] * 3
    assert _served_equals(fake, load_file(tmp_path / "out" / "model.safetensors"))
    assert len(fake.calls("/v1/completions")) == 2 * 2  # 2 steps x 2 processes x 1 prompt
