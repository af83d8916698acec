"""What a config needs from the machine, found before any data or weights load.

Each check is one ``key: what is wrong; the fix`` line from ``ebft.train.preflight``, reported together by
``ebft validate`` (exit 2, nothing on stdout) and by ``ebft train`` before it writes or loads anything. On
the code before this change ``ebft validate`` passed every one of these configs and ``ebft train`` found
the missing wandb only after loading the data and the model.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from ebft.cli import main
from ebft.config import load_config
from ebft.errors import ConfigError
from ebft.modeling.adapters import QUANTISATION_NEEDS
from ebft.train.preflight import preflight
from ebft.vllm.backend import probe_server, wait_for_server


def _write(tmp_path: Path, **keys) -> Path:
    raw = {
        "base_model": keys.pop("base_model"),
        "rl": "ebft",
        "ebft": {"mode": "strided", "context_length": 4, "generate_max_len": 4, "stride": 4},
        "datasets": [{"path": str(tmp_path / "docs.jsonl"), "type": "ebft_pretrain.transform"}],
        "sequence_len": 64,
        "max_steps": 1,
        "output_dir": str(tmp_path / "out"),
        **keys,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "def f(x):\n    return x * 2\n" * 8}) + "\n" for _ in range(4)))
    return path


def _problems(path: Path, command: str = "train", **kwargs) -> list[str]:
    return preflight(load_config(path), command, **kwargs).problems


def test_a_ready_config_has_no_problems(tiny_model_dir, tmp_path, docs):
    assert _problems(_write(tmp_path, base_model=str(tiny_model_dir)), installed=lambda _: True) == []


def test_each_optional_package_is_named_with_its_key_and_extra(tiny_model_dir, tmp_path, docs):
    path = _write(
        tmp_path,
        base_model=str(tiny_model_dir),
        wandb_project="ebft",
        use_tensorboard=True,
        adapter="qlora",
        load_in_4bit=True,
        lora_target_linear=True,
    )
    assert _problems(path, installed=lambda _: False) == [
        "wandb_project: needs the wandb package, which is not installed; pip install 'ebft[wandb]' "
        "(or set wandb_project: null)",
        "use_tensorboard: needs the tensorboard package, which is not installed; pip install 'ebft[tensorboard]'",
        f"load_in_4bit: needs {QUANTISATION_NEEDS}; it is not installed",
    ]
    # Evaluation logs to no tracker; the vLLM server needs vllm (and no training data).
    assert _problems(path, "evaluate", installed=lambda _: False) == [
        f"load_in_4bit: needs {QUANTISATION_NEEDS}; it is not installed"
    ]
    assert _problems(path, "vllm-serve", installed=lambda _: False)[-1] == (
        "trl.use_vllm: needs the vllm package, which is not installed; pip install 'ebft[vllm]' (it needs a CUDA "
        "GPU and its own torch build; without trl.use_vllm, rollouts use transformers generate)"
    )
    assert _problems(path, installed=lambda _: True) == []


def test_a_gguf_base_needs_the_gguf_package_until_it_is_converted(tmp_path, docs, monkeypatch):
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    path = _write(tmp_path, base_model=str(gguf))
    assert _problems(path, installed=lambda p: p != "gguf") == [
        f"base_model: reading the GGUF file {gguf.resolve()} needs the gguf package: pip install 'ebft[gguf]'"
    ]
    assert _problems(_write(tmp_path, base_model=str(tmp_path / "missing.gguf"))) == [
        f"base_model: no such GGUF file '{tmp_path / 'missing.gguf'}'"
    ]


def test_model_and_tokenizer_folders(tiny_model_dir, tmp_path, docs):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _problems(_write(tmp_path, base_model=str(empty))) == [
        f"base_model: the folder '{empty}' holds no config.json, so it is not a Hugging Face model folder",
        f"base_model: the folder '{empty}' holds no tokenizer (none of tokenizer.json, tokenizer_config.json, "
        "tokenizer.model, vocab.json, spiece.model); save the tokenizer there or set tokenizer_config to a folder "
        "or hub id that has one",
    ]
    assert _problems(_write(tmp_path, base_model=str(tmp_path / "nope")))[0].startswith(
        f"base_model: no such folder '{tmp_path / 'nope'}'"
    )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert (
        "holds a LoRA adapter, not a model; set base_model to the model it was trained on"
        in (_problems(_write(tmp_path, base_model=str(adapter)))[0])
    )
    # A model folder without tokenizer files, and a tokenizer_config that names one.
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert _problems(_write(tmp_path, base_model=str(weights_only))) == [
        f"base_model: the folder '{weights_only}' holds no tokenizer (none of tokenizer.json, tokenizer_config.json, "
        "tokenizer.model, vocab.json, spiece.model); save the tokenizer there or set tokenizer_config to a folder "
        "or hub id that has one"
    ]
    fixed = _write(tmp_path, base_model=str(weights_only), tokenizer_config=str(tiny_model_dir))
    assert _problems(fixed) == []


def test_offline_hub_id_not_in_the_cache(tmp_path, docs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    problems = _problems(_write(tmp_path, base_model="someone/not-downloaded"))
    assert problems == [
        "base_model: 'someone/not-downloaded' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
        "download it first (unset HF_HUB_OFFLINE) or give a local folder"
    ]


def test_data_files_transforms_adapters_and_templates(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    path = _write(
        tmp_path,
        base_model=str(tiny_model_dir),
        datasets=[
            {"path": "data/train.jsonl", "type": "ebft_pretrain.transform"},
            {"path": "folder", "type": "my_transforms.transform"},
        ],
        adapter="lora",
        lora_model_dir="./sft-adapter",
        chat_template_jinja=str(tmp_path / "t.jinja"),
    )
    assert _problems(path, config_dir=tmp_path) == [
        f"lora_model_dir: no such folder './sft-adapter' (relative paths are read from {tmp_path})",
        f"chat_template_jinja: no such template file '{tmp_path / 't.jinja'}' (give the Jinja text itself, "
        "or a file path)",
        f"datasets.0.path: no such file or folder 'data/train.jsonl' (relative paths are read from {tmp_path})",
        "datasets.1.path: dataset 'folder': the folder has no .csv/.json/.jsonl/.parquet/.txt files",
        "datasets.1.type: dataset type 'my_transforms.transform': cannot import module 'my_transforms' (No module "
        "named 'my_transforms'); it is neither a built-in transform (ebft_pretrain, ebft_strided_structured, "
        "ebft_strided_chat, ebft_opencode, ebft_chat_multiturn, ebft_reasoning) nor importable from sys.path or "
        f"in {tmp_path}",
    ]
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    broken = load_config(path)
    assert (
        "chat_template_jinja: not a valid Jinja template (line 1: "
        in preflight(broken, config_dir=tmp_path).problems[1]
    )


def test_validate_lists_every_problem_and_prints_no_config(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # absent, whether or not it is installed here
    path = _write(tmp_path, base_model=str(tiny_model_dir), wandb_project="ebft")
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"error: {path}: the config is valid but training cannot start here, 2 problems:\n"
        "  wandb_project: needs the wandb package, which is not installed; pip install 'ebft[wandb]' (or set "
        "wandb_project: null)\n"
        f"  datasets.0.path: no such file or folder '{tmp_path / 'docs.jsonl'}'\n"
    )


def test_train_stops_before_writing_or_loading_anything(tiny_model_dir, tmp_path, docs, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    path = _write(tmp_path, base_model=str(tiny_model_dir), wandb_project="ebft")
    started = time.perf_counter()
    assert main(["train", str(path)]) == 2
    assert time.perf_counter() - started < 20  # (loading data and model took ~40 s on the machine)
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: cannot train on this machine, 1 problem:\n  wandb_project: needs the wandb")
    assert not (tmp_path / "out").exists()  # no config.yaml written, nothing loaded
    assert main(["train", str(path), "--wandb_project=null"]) == 0


def test_the_loggers_own_import_check_stays(tmp_path, monkeypatch):
    """The second line of defence, for a MetricsLogger made from code."""
    from ebft.train.reporting import MetricsLogger

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="wandb_project is set but the 'wandb' package is not installed"):
        MetricsLogger(tmp_path, wandb_project="x")


def test_vllm_server_probe_and_wait(tiny_model_dir, tmp_path, docs, caplog, capsys):
    port = _free_port()
    path = _write(
        tmp_path,
        base_model=str(tiny_model_dir),
        ebft={"mode": "structured"},
        datasets=[{"path": str(docs), "type": "ebft_opencode.transform"}],
        micro_batch_size=4,
        trl={"use_vllm": True, "vllm_server_port": port, "vllm_server_timeout": 1.5, "max_completion_length": 16},
    )
    cfg = load_config(path)
    assert probe_server(cfg, seconds=0.2) == (
        f"trl.use_vllm: no vLLM server answers at 127.0.0.1:{port} yet; start it with `ebft vllm-serve CFG` before "
        "`ebft train`, which waits for it up to trl.vllm_server_timeout = 1.5 s"
    )
    with caplog.at_level(logging.INFO, logger="ebft"), pytest.raises(ConfigError) as info:
        wait_for_server(cfg)
    assert str(info.value).startswith(f"trl.use_vllm: no vLLM server is ready at 127.0.0.1:{port} after 1.5s")
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for the vLLM server")]
    assert waits and f"at http://127.0.0.1:{port} (" in waits[0] and "s left; start it with" in waits[0]
    # `ebft train` waits so before it writes or loads anything (the run said nothing for 240 s).
    assert main(["train", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"waiting for the vLLM server at http://127.0.0.1:{port} (" in err
    assert f"error: trl.use_vllm: no vLLM server is ready at 127.0.0.1:{port} after 1.5s" in err
    assert not (tmp_path / "out").exists()


def test_training_from_code_runs_the_same_checks(tiny_model_dir, tmp_path, docs, monkeypatch):
    from ebft.modes import mode_of
    from ebft.train.loop import train

    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(_write(tmp_path, base_model=str(tiny_model_dir), wandb_project="ebft"))
    with pytest.raises(ConfigError, match="cannot train on this machine, 1 problem:\n  wandb_project: needs the"):
        train(cfg, mode_of(cfg))
    assert not (tmp_path / "out").exists()


def test_wait_until_ready_says_where_and_how_long(tiny_model_dir, caplog):
    from fake_vllm import FakeVLLMServer

    from ebft.vllm.client import VLLMClient

    with FakeVLLMServer(tiny_model_dir) as fake:
        fake.fail_next(6, status=503)  # a server still loading its model
        client = VLLMClient(fake.host, fake.port, timeout=5)
        with caplog.at_level(logging.INFO, logger="ebft"):
            client.wait_until_ready(timeout=30, interval=0.05, report_every=0.1)
    lines = [r.getMessage() for r in caplog.records]
    waits = [line for line in lines if line.startswith(f"waiting for the vLLM server at {client.base_url} (HTTP 503")]
    assert waits and all(" s left; start it with `ebft vllm-serve CFG`" in line for line in waits)
    left = [float(line.split("): ")[1].split(" s left")[0]) for line in waits]
    assert left[0] in (29.0, 30.0) and left == sorted(left, reverse=True)  # counts down from the timeout
    assert lines[-1].startswith(f"vLLM server at {client.base_url} is ready (after ")


def test_package_available_honours_blocked_imports(monkeypatch):
    from ebft.modeling.optional import package_available

    assert package_available("json") and not package_available("surely_not_a_package_name")
    monkeypatch.setitem(sys.modules, "json", None)
    assert not package_available("json")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_what_the_models_config_says_is_checked_too(tiny_model_dir, tmp_path, docs):
    """Before this change only `train` read config.json; now `validate` does too."""
    assert _problems(_write(tmp_path, base_model=str(tiny_model_dir), sequence_len=8192), "validate") == [
        "sequence_len: 8192 exceeds the model's max_position_embeddings (4096)"
    ]
