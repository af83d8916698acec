"""The vLLM client and backend against the fake server: requests, completions and log-probs, retries and
errors, readiness, per-prompt caps and seeds, and adapter syncs.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from fake_vllm import COMPLETIONS

from ebft.errors import ConfigError
from ebft.structured.rollout import Sampling
from ebft.vllm.client import VLLMClient, VLLMError
from ebft.vllm.lora import VLLMBackend


@pytest.fixture
def client(fake):
    return VLLMClient(fake.host, fake.port, timeout=30.0, retries=2, backoff=0.01)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ["def add(a, b):\n", "import os\nimport", "class Parser:\n    def"]
    return [tiny_tokenizer(t)["input_ids"] for t in texts]


def _backend(client, fake, tmp_path, *, sampling=None, interval=1) -> VLLMBackend:
    return VLLMBackend(
        client,
        sampling=sampling or Sampling(),
        lora_name="policy",
        adapter_dir=tmp_path / "adapters",
        sync_interval=interval,
        base_model_name=fake.served_model_name,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- client: request and answer ---------------------------------------------------------------


def test_request_carries_sampling_seed_and_model(client, fake, prompts):
    sampling = Sampling(temperature=0.8, top_p=0.9, top_k=0, min_p=0.05, repetition_penalty=1.1, stop_token_ids=(2, 5))
    client.complete(prompts[:2], n=3, max_tokens=4, sampling=sampling, seed=123, model=fake.served_model_name)
    (call,) = fake.calls(COMPLETIONS)
    assert call.body == {
        "model": fake.served_model_name,
        "prompt": prompts[:2],
        "n": 3,
        "max_tokens": 4,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": -1,  # vLLM's spelling of "off"
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "stop_token_ids": [2, 5],
        "seed": 123,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
    }
    client.complete(prompts[:1], n=1, max_tokens=2, sampling=Sampling(top_k=7), seed=1, model=fake.served_model_name)
    assert fake.calls(COMPLETIONS)[-1].body["top_k"] == 7


def test_completions_are_the_servers_tokens_and_logprobs_in_prompt_order(client, fake, prompts):
    out = client.complete(prompts, n=2, max_tokens=5, sampling=Sampling(), seed=3, model=fake.served_model_name)
    choices = fake.calls(COMPLETIONS)[0].answer["choices"]
    assert [len(group) for group in out] == [2, 2, 2]
    for p, group in enumerate(out):
        for j, completion in enumerate(group):
            choice = choices[p * 2 + j]
            assert choice["index"] == p * 2 + j
            assert completion.ids == tuple(int(t.split(":")[1]) for t in choice["logprobs"]["tokens"])
            assert completion.logprobs == tuple(choice["logprobs"]["token_logprobs"])
            assert completion.finished == (choice["finish_reason"] == "stop")
            if not completion.finished:
                assert len(completion.ids) == 5


def test_logprobs_are_the_tempered_truncated_distribution(client, fake, prompts):
    """The fake's numbers are vLLM's processed log-probs: checked against the model run independently."""
    sampling = Sampling(temperature=0.7, top_k=20)
    (group,) = client.complete(prompts[:1], n=1, max_tokens=6, sampling=sampling, seed=5, model=fake.served_model_name)
    completion = group[0]
    ids = torch.tensor([prompts[0] + list(completion.ids)])
    with torch.no_grad():
        logits = fake.base(input_ids=ids).logits[0].float()
    start = len(prompts[0]) - 1
    expected = []
    for t, token in enumerate(completion.ids):
        scaled = logits[start + t] / 0.7
        kth = scaled.topk(20).values[-1]
        lp = torch.log_softmax(scaled.masked_fill(scaled < kth, float("-inf")), dim=-1)
        expected.append(float(lp[token]))
    assert completion.logprobs == pytest.approx(expected, abs=1e-4)
    # top_k = 1 leaves one token: the processed (sampling) distribution gives it log-prob 0.
    (greedy,) = client.complete(
        prompts[:1], n=2, max_tokens=4, sampling=Sampling(top_k=1), seed=5, model=fake.served_model_name
    )
    assert all(lp == pytest.approx(0.0, abs=1e-6) for c in greedy for lp in c.logprobs)


def test_same_seed_same_completions(client, fake, prompts):
    def draw(seed):
        return client.complete(prompts, n=2, max_tokens=6, sampling=Sampling(), seed=seed, model=fake.served_model_name)

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


def test_stop_token_ends_a_completion_and_stays_in_its_ids(client, fake, prompts):
    greedy = Sampling(temperature=0.0)
    model = fake.served_model_name
    (free,) = client.complete(prompts[:1], n=1, max_tokens=8, sampling=greedy, seed=0, model=model)
    ids = free[0].ids
    k = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)  # its first occurrence
    stopping = Sampling(temperature=0.0, stop_token_ids=(ids[k],))
    (group,) = client.complete(prompts[:1], n=2, max_tokens=8, sampling=stopping, seed=0, model=model)
    for completion in group:
        assert completion.finished
        assert completion.ids == ids[: k + 1]  # ends with the stop token, which has its log-prob
        assert len(completion.logprobs) == k + 1
    choice = fake.calls(COMPLETIONS)[-1].answer["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", ids[k])
    (capped,) = client.complete(prompts[:1], n=1, max_tokens=k, sampling=stopping, seed=0, model=model)
    assert not capped[0].finished and capped[0].ids == ids[:k]


# -- client: failures -------------------------------------------------------------------------


def test_transient_500s_are_retried(client, fake, prompts):
    fake.fail_next(2)
    out = client.complete(prompts[:1], n=1, max_tokens=2, sampling=Sampling(), seed=0, model=fake.served_model_name)
    assert len(out[0][0].ids) == 2
    assert [c.status for c in fake.calls(COMPLETIONS)] == [500, 500, 200]


def test_persistent_500_names_endpoint_attempts_and_cause(client, fake, prompts):
    fake.fail_next(3, message="CUDA out of memory")
    with pytest.raises(VLLMError) as info:
        client.complete(prompts[:1], n=1, max_tokens=2, sampling=Sampling(), seed=0, model=fake.served_model_name)
    message = str(info.value)
    assert f"{client.base_url}/v1/completions" in message
    assert "3 attempt(s)" in message and "HTTP 500: CUDA out of memory" in message
    assert len(fake.calls(COMPLETIONS)) == 3


def test_timeout_is_retried_then_reported(fake, prompts):
    fake.delay = 1.0
    quick = VLLMClient(fake.host, fake.port, timeout=0.2, retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(VLLMError, match=r"2 attempt\(s\): timed out"):
        quick.complete(prompts[:1], n=1, max_tokens=2, sampling=Sampling(), seed=0, model=fake.served_model_name)
    assert time.monotonic() - start < 1.5


def test_4xx_is_not_retried_and_carries_the_servers_message(client, fake, prompts):
    with pytest.raises(VLLMError, match=r"HTTP 404\): The model `nope` does not exist"):
        client.complete(prompts[:1], n=1, max_tokens=2, sampling=Sampling(), seed=0, model="nope")
    with pytest.raises(VLLMError, match=r"HTTP 400\): prompt:"):
        client.complete([[-1]], n=1, max_tokens=2, sampling=Sampling(), seed=0, model=fake.served_model_name)
    with pytest.raises(VLLMError, match=r"HTTP 404\): The lora adapter 'ghost' cannot be found"):
        client.unload_lora_adapter("ghost")
    request = urllib.request.Request(f"{client.base_url}/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
    assert info.value.code == 400 and "JSON object" in json.loads(info.value.read())["error"]["message"]
    assert [c.status for c in fake.requests] == [404, 400, 404, 400]  # one attempt each


def test_ready_server_and_one_still_starting(client, fake):
    client.wait_until_ready(timeout=5)
    fake.fail_next(2, status=503)
    client.wait_until_ready(timeout=5, interval=0.01)
    assert [c.status for c in fake.calls("/health")] == [200, 503, 503, 200]


def test_dead_server_says_how_to_start_it():
    port = _free_port()
    client = VLLMClient("127.0.0.1", port, timeout=0.5)
    with pytest.raises(VLLMError) as info:
        client.wait_until_ready(timeout=0.3, interval=0.05)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "ebft vllm-serve CFG" in message and "trl.vllm_server_host" in message


# -- backend ----------------------------------------------------------------------------------


def test_generate_sends_each_prompt_with_its_cap_and_seed(client, fake, prompts, tmp_path):
    backend = _backend(client, fake, tmp_path)
    out = backend.generate(prompts, n=3, max_tokens=[4, 6, 4], seeds=[10, 11, 12])
    bodies = sorted((c.body for c in fake.calls(COMPLETIONS)), key=lambda body: body["seed"])
    assert [(b["prompt"], b["max_tokens"], b["seed"], b["n"]) for b in bodies] == [
        ([prompts[0]], 4, 10, 3),
        ([prompts[1]], 6, 11, 3),
        ([prompts[2]], 4, 12, 3),
    ]
    assert all(b["model"] == fake.served_model_name for b in bodies)
    assert [len(group) for group in out] == [3, 3, 3]
    for group, cap in zip(out, [4, 6, 4], strict=True):
        assert all(len(c.ids) <= cap and (c.finished or len(c.ids) == cap) for c in group)
    # A prompt's completions depend on its own seed and cap only, not on the other prompts of the call.
    alone = backend.generate([prompts[2]], n=3, max_tokens=[4], seeds=[12])
    assert alone == [out[2]]
    assert backend.generate(prompts[::-1], n=3, max_tokens=[4, 6, 4], seeds=[12, 11, 10]) == out[::-1]
    assert backend.generate([prompts[2]], n=3, max_tokens=[4], seeds=[13]) != alone


def _peft_model(model_dir: Path, scale: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    return model


def test_sync_loads_every_interval_and_cleans_up(client, fake, prompts, tmp_path, tiny_model_dir):
    backend = _backend(client, fake, tmp_path, sampling=Sampling(temperature=0.0), interval=2)
    model = _peft_model(tiny_model_dir, scale=0.5)
    loads = lambda: fake.calls("/v1/load_lora_adapter")  # noqa: E731
    base_out = backend.generate(prompts[:1], n=1, max_tokens=[6], seeds=[0])

    backend.sync(model, 0)  # a fresh adapter is zero: the server's base model already is the policy
    backend.sync(model, 1)
    assert loads() == [] and backend.model_name == fake.served_model_name

    backend.sync(model, 2)
    (first,) = loads()
    name, folder = first.body["lora_name"], Path(first.body["lora_path"])
    assert name.startswith("policy-") and name.endswith("-step2")
    assert folder == (tmp_path / "adapters" / "policy-step-000002").resolve()
    assert (folder / "adapter_config.json").is_file() and not list(folder.parent.glob("*.tmp"))
    assert backend.model_name == name and set(fake.adapters) == {name}
    adapted = backend.generate(prompts[:1], n=1, max_tokens=[6], seeds=[0])
    assert fake.calls(COMPLETIONS)[-1].body["model"] == name
    assert adapted != base_out  # the server generated with the adapter

    backend.sync(model, 3)
    assert len(loads()) == 1
    backend.sync(model, 4)
    second = loads()[-1].body["lora_name"]
    assert second.endswith("-step4") and backend.model_name == second
    # The replaced adapter stays until the next sync: a rollout already under way may still name it.
    assert set(fake.adapters) == {name, second} and folder.is_dir()
    assert fake.calls("/v1/unload_lora_adapter") == []
    backend.sync(model, 6)
    third = loads()[-1].body["lora_name"]
    assert set(fake.adapters) == {second, third} and not folder.exists()
    assert [c.body for c in fake.calls("/v1/unload_lora_adapter")] == [{"lora_name": name}]

    backend.close()
    assert fake.adapters == {} and not (tmp_path / "adapters").exists()
    assert backend.model_name == fake.served_model_name


def test_first_sync_of_a_resumed_run_loads_whatever_the_interval(client, fake, tmp_path, tiny_model_dir):
    backend = _backend(client, fake, tmp_path, interval=4)
    backend.sync(_peft_model(tiny_model_dir, scale=0.1), 6)
    (load,) = fake.calls("/v1/load_lora_adapter")
    assert load.body["lora_name"].endswith("-step6") and backend.model_name == load.body["lora_name"]
    backend.sync(_peft_model(tiny_model_dir, scale=0.1), 7)
    assert len(fake.calls("/v1/load_lora_adapter")) == 1
    backend.close()


def test_first_sync_of_a_warm_start_loads_at_step_0(client, fake, tmp_path, tiny_model_dir):
    backend = VLLMBackend(
        client,
        sampling=Sampling(),
        lora_name="policy",
        adapter_dir=tmp_path / "adapters",
        sync_interval=4,
        base_model_name=fake.served_model_name,
        fresh_adapter=False,  # lora_model_dir: the adapter is trained, the server's base is not the policy
    )
    backend.sync(_peft_model(tiny_model_dir, scale=0.1), 0)
    (load,) = fake.calls("/v1/load_lora_adapter")
    assert load.body["lora_name"].endswith("-step0") and backend.model_name == load.body["lora_name"]
    backend.close()


def test_failed_load_keeps_the_previous_adapter(client, fake, tmp_path, tiny_model_dir):
    backend = _backend(client, fake, tmp_path)
    model = _peft_model(tiny_model_dir, scale=0.1)
    backend.sync(model, 0)
    backend.sync(model, 1)
    current = backend.model_name
    fake.fail_next(1, status=400, message="bad adapter")
    with pytest.raises(VLLMError, match="bad adapter"):
        backend.sync(model, 2)
    assert backend.model_name == current and set(fake.adapters) == {current}
    assert not (tmp_path / "adapters" / "policy-step-000002").exists()
    assert (tmp_path / "adapters" / "policy-step-000001").is_dir()
    backend.close()


def test_sync_needs_a_lora_model(client, fake, tmp_path):
    backend = _backend(client, fake, tmp_path)
    backend.sync(torch.nn.Linear(2, 2), 0)
    with pytest.raises(ConfigError, match="adapter: lora"):
        backend.sync(torch.nn.Linear(2, 2), 1)
