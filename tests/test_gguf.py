"""A ``.gguf`` base model: conversion to a cached folder, the cache, and every way a file can be wrong.

Tiny GGUF files are written from a tiny Llama with the ``gguf`` package (``gguf_files``), so the
converted model can be checked against the very model the file was written from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_texts

pytest.importorskip("gguf", reason="the GGUF tests need the gguf package: pip install 'ebft[gguf]'")

from gguf_files import write_llama_gguf  # noqa: E402  (needs gguf)

from ebft.cli import main  # noqa: E402
from ebft.errors import ConfigError  # noqa: E402
from ebft.modeling.source import SOURCE_FILE, gguf_to_folder, local_model

SAMPLE = "def area(r):\n    return 3.14159 * r ** 2\n<|user|>\nwhat is this?</s>\n"


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    """A tied-embedding Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaForCausalLM

    from ebft.quickstart.scratch import llama_config

    torch.manual_seed(0)
    tok = tiny_tokenizer
    cfg = llama_config(len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, tokenizer=tok)
    cfg.tie_word_embeddings = True
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def gguf_file(tiny, tiny_tokenizer, tmp_path) -> Path:
    return write_llama_gguf(tiny, tiny_tokenizer, tmp_path / "tiny-chat.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache, through the environment variable users set."""
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _converting(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "converting" in r.getMessage()]


def test_converted_folder_computes_what_the_file_holds(tiny, tiny_tokenizer, gguf_file, cache):
    """Oracle: the converted model's logits equal the original model's, and its tokenizer encodes like
    the original (special tokens whole), with eos, pad and chat template kept and embeddings tied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_to_folder(gguf_file)
    stat = gguf_file.stat()
    assert folder == cache / f"tiny-chat-{stat.st_size}-{stat.st_mtime_ns}"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tiny_tokenizer(SAMPLE, return_tensors="pt").input_ids
    assert tok(SAMPLE).input_ids == ids[0].tolist()
    # Not one token more: transformers' GGUF reader adds <|endoftext|> to a byte-level vocabulary that
    # lacks it, a token without an embedding row; the conversion drops it.
    assert tok.get_vocab() == tiny_tokenizer.get_vocab() and len(tok) == model.config.vocab_size
    with torch.no_grad():
        # F32 tensors round-trip exactly; the q/k row order is undone on load, so any mix-up shows here.
        torch.testing.assert_close(model(ids).logits, tiny(ids).logits, atol=1e-6, rtol=0)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("</s>", "<pad>", "<s>")
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert json.loads((folder / SOURCE_FILE).read_text())["gguf_file"] == str(gguf_file.resolve())


def test_cache_is_reused_and_a_changed_file_is_converted_again(gguf_file, cache, caplog):
    caplog.set_level(logging.INFO, logger="ebft")
    first = gguf_to_folder(gguf_file)
    weights = first / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert len(_converting(caplog)) == 1
    caplog.clear()
    assert gguf_to_folder(str(gguf_file)) == first
    assert local_model(str(gguf_file)) == str(first)
    assert _converting(caplog) == [] and weights.stat().st_mtime_ns == written
    # A file rewritten in place (new mtime) is a different model: converted anew, next to the old one.
    os.utime(gguf_file, ns=(gguf_file.stat().st_atime_ns, gguf_file.stat().st_mtime_ns + 10**9))
    second = gguf_to_folder(gguf_file)
    assert second != first and len(_converting(caplog)) == 1
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted([first.name, second.name])


def test_relative_path_and_explicit_cache_dir(gguf_file, tmp_path, monkeypatch):
    monkeypatch.chdir(gguf_file.parent)
    folder = gguf_to_folder(gguf_file.name, cache_dir=tmp_path / "elsewhere")
    assert folder.parent == tmp_path / "elsewhere" and (folder / "config.json").is_file()


def test_failed_conversion_leaves_no_folder_and_stale_partials_are_removed(tiny, tiny_tokenizer, tmp_path, cache):
    """A file lacking a weight is refused (it would load as random values), and neither the failed
    conversion nor an earlier interrupted one leaves anything a loader could pick up."""
    bad = write_llama_gguf(tiny, tiny_tokenizer, tmp_path / "holey.gguf", skip=["model.layers.1.mlp.up_proj.weight"])
    stat = bad.stat()
    stale = cache / f".holey-{stat.st_size}-{stat.st_mtime_ns}.12345.partial"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holey\.gguf has no weights for model\.layers\.1\.mlp\.up_proj\.weight"):
        gguf_to_folder(bad)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_corrupt_file_is_a_clear_error_naming_it(gguf_file, cache, damage):
    data = gguf_file.read_bytes()
    broken = gguf_file.with_name(f"{damage}.gguf")
    broken.write_bytes({"random": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(
        ConfigError, match=rf"base_model: {re.escape(str(broken))} is not a readable GGUF file \(corrupt, truncated"
    ):
        gguf_to_folder(broken)
    assert not cache.exists() or [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_unsupported_architecture_is_a_clear_error(tiny, tiny_tokenizer, tmp_path, cache):
    odd = write_llama_gguf(tiny, tiny_tokenizer, tmp_path / "encoder.gguf", architecture="bert")
    with pytest.raises(ConfigError, match=r"cannot convert the GGUF file .*encoder\.gguf \(architecture 'bert'\)"):
        gguf_to_folder(odd)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"base_model: '.*nowhere\.gguf': no such file"):
        gguf_to_folder(tmp_path / "nowhere.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a GGUF file"):
        gguf_to_folder(tmp_path / "dir.gguf", key="tokenizer_config")


def _strided_config(tmp_path: Path, base_model: str, **top) -> Path:
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t[:3000]}) + "\n" for t in stdlib_texts(6)), encoding="utf-8")
    config = {
        "base_model": base_model,
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 1,
        "learning_rate": 1e-3,
        "bf16": False,
        "output_dir": str(tmp_path / "run"),
        **top,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_gguf_package_missing_says_what_to_install(gguf_file, cache, tmp_path, monkeypatch, capsys):
    """Through the CLI: one line naming the file and the install command, exit status 2."""
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    assert main(["train", str(_strided_config(tmp_path, str(gguf_file)))]) == 2
    err = capsys.readouterr().err
    assert f"{gguf_file}" in err and "needs the gguf package: pip install 'ebft[gguf]'" in err


def test_corrupt_file_through_the_cli(tmp_path, cache, capsys):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(64))
    assert main(["train", str(_strided_config(tmp_path, str(broken)))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: base_model: ") and "broken.gguf is not a readable GGUF file" in err
    assert "Traceback" not in err


def test_lora_training_on_a_gguf_saves_an_adapter_over_the_cached_folder(gguf_file, cache, tmp_path, capsys):
    """Everything downstream sees the converted folder: training, the adapter's base, vllm-serve."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _strided_config(tmp_path, str(gguf_file), adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True)
    assert main(["train", str(cfg)]) == 0
    folder = gguf_to_folder(gguf_file)
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(folder)
    # The resolved config keeps what the user wrote; the folder is a cache, not the model's identity.
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["base_model"] == str(gguf_file)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "run")
    assert any("lora_A" in name for name, _ in merged.named_parameters())
    capsys.readouterr()
    assert main(["vllm-serve", str(cfg), "--print-command"]) == 0
    assert f"--model {folder} " in capsys.readouterr().out
