"""Warm starts from a LoRA adapter (``lora_model_dir``), the feature-network choice, and quantised bases.

Oracles: the warm-started policy's first Adam step moves each adapter weight by at most the learning
rate from the saved adapter (so training started from it, not from a fresh adapter, whose lora_B is 0);
the default feature network equals the plain base model's hidden states, the ``warm_start`` one equals
the merged base+adapter model's and stays put while the policy trains; the QLoRA feature network equals
a separately loaded 4-bit base model's forward.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from config_builders import write_run_config
from conftest import stdlib_texts
from safetensors.torch import load_file, save_file

from ebft.cli import main
from ebft.config import parse_config

SFT_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rows = [{"text": t[:4000]} for t in stdlib_texts(16) if len(t) >= 2000]
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _save_adapter(base_dir: Path, out: Path, *, r: int = 4, targets=SFT_TARGETS, seed: int = 1) -> Path:
    """A LoRA adapter with non-zero lora_B (a trained adapter, unlike a fresh one), saved with PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    return _save_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "adapter")


def _config(model_dir, data, **top) -> dict:
    ebft = {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 2}
    ebft.update(top.pop("ebft", {}))
    config = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": ebft,
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 1,
        "learning_rate": 1e-4,
        "lr_scheduler": "constant",
        "bf16": False,
        "seed": 0,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
    }
    config.update(top)
    return config


def _fails(capsys, path: Path) -> str:
    assert main(["train", str(path)]) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Warm start through the CLI


def test_warm_start_continues_the_saved_adapter(tmp_path, tiny_model_dir, text_file, sft_adapter):
    config = _config(tiny_model_dir, text_file, lora_model_dir=str(sft_adapter))
    assert main(["train", str(write_run_config(tmp_path, "warm", config))]) == 0

    before, after = (
        load_file(sft_adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "warm" / "adapter_model.safetensors"),
    )
    assert before.keys() == after.keys() and any("lora_B" in k for k in before)
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    # One Adam step moves each weight by lr * m_hat / (sqrt(v_hat) + eps) = lr * g / (|g| + eps), at most lr
    # = 1e-4 (plus fp32 rounding: the spacing of floats near 0.05 is 3.7e-9), while the saved lora_B entries
    # are ~0.05 in size: training started from this adapter.
    assert 0 < moved <= 1e-4 + 1e-8
    assert max(float(v.abs().max()) for k, v in before.items() if "lora_B" in k) > 100 * 1e-4
    saved = json.loads((tmp_path / "warm" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == SFT_TARGETS and saved["r"] == 4


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"lora_model_dir": "/nonexistent/adapter"}, "lora_model_dir: no such folder '/nonexistent/adapter'"),
        ({"lora_r": 8}, "lora_r: 8 differs from the adapter in lora_model_dir (4, in"),
        ({"lora_alpha": 4}, "lora_alpha: 4 differs from the adapter in lora_model_dir (8, in"),
        (
            {"lora_target_modules": ["k_proj", "v_proj"]},
            "lora_target_modules / lora_target_linear select other modules than the adapter in lora_model_dir "
            "(only in the config: ['model.layers.0.self_attn.k_proj'",
        ),
    ],
    ids=["missing folder", "rank", "alpha", "targets"],
)
def test_warm_start_mismatches_are_errors(tmp_path, tiny_model_dir, text_file, sft_adapter, capsys, change, expected):
    config = _config(tiny_model_dir, text_file, **{"lora_model_dir": str(sft_adapter), **change})
    err = _fails(capsys, write_run_config(tmp_path, "bad", config))
    assert expected in err, err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_same_targets_spelled_differently_are_accepted(tmp_path, tiny_model_dir, sft_adapter):
    from ebft.modeling.policy import load_policy
    from ebft.modeling.tokenizer import load_tokenizer

    cfg = parse_config(
        _config(tiny_model_dir, "x.jsonl", lora_model_dir=str(sft_adapter), lora_target_modules=r".*\.(v_proj|q_proj)")
    )
    policy = load_policy(cfg, load_tokenizer(cfg), torch.device("cpu"))
    assert {n.rsplit(".", 1)[-1] for n, _ in policy.named_modules() if n.endswith(("q_proj", "v_proj"))} == set(
        SFT_TARGETS
    )


def test_adapter_folder_problems_are_errors(tmp_path, tiny_model_dir, text_file, sft_adapter, capsys):
    # A full model folder where the adapter should be.
    err = _fails(
        capsys,
        write_run_config(tmp_path, "full", _config(tiny_model_dir, text_file, lora_model_dir=str(tiny_model_dir))),
    )
    assert "holds no adapter_config.json, so it is no PEFT adapter (it holds a full model" in err

    # An adapter trained on another architecture (hidden size 32, not 64): its shapes do not fit.
    from ebft.quickstart.scratch import build_model_dir

    other = build_model_dir(tmp_path / "other", stdlib_texts(8), vocab_size=384, seed=0, hidden_size=32, num_layers=4)
    foreign = _save_adapter(other, tmp_path / "foreign")
    err = _fails(
        capsys, write_run_config(tmp_path, "foreign", _config(tiny_model_dir, text_file, lora_model_dir=str(foreign)))
    )
    assert "lora_model_dir: cannot load the adapter weights of" in err and "size mismatch" in err, err

    # An adapter file that lost a tensor.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((sft_adapter / "adapter_config.json").read_text())
    weights = load_file(sft_adapter / "adapter_model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, broken / "adapter_model.safetensors")
    err = _fails(
        capsys, write_run_config(tmp_path, "broken", _config(tiny_model_dir, text_file, lora_model_dir=str(broken)))
    )
    assert "do not match its adapter_config.json" in err and "missing: [" in err, err


# ---------------------------------------------------------------------------------------------
# Which network embeds: the base (default) or the warm-started model


def _hidden(model, ids: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return [out.hidden_states[i] for i in layers]


def test_feature_network_is_the_base_or_the_frozen_warm_start(tiny_model_dir, sft_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ebft.modeling.adapters import warm_start_critic
    from ebft.modeling.feature_network import feature_network_for
    from ebft.modeling.policy import load_policy
    from ebft.modeling.tokenizer import load_tokenizer

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    merged = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa"), sft_adapter
        )
        .merge_and_unload()
        .eval()
    )
    layers = [1, 2]  # feature_layers 0.25 and 0.5 of 4 layers; layer 2 is the deepest, before the final norm

    def features(choice: str):
        cfg = parse_config(
            _config(
                tiny_model_dir,
                "x.jsonl",
                lora_model_dir=str(sft_adapter),
                ebft={"feature_network": choice, "feature_layers": [0.25, 0.5]},
            )
        )
        policy = load_policy(cfg, load_tokenizer(cfg), torch.device("cpu"))
        return policy, feature_network_for(cfg, policy, torch.device("cpu"), frozen_copy=warm_start_critic(cfg))

    policy, net = features("base")
    assert net.shared  # the base weights under disable_adapter: no copy
    for got, want in zip(net(ids, pos), _hidden(base, ids, layers), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    policy, net = features("warm_start")
    assert not net.shared
    first = net(ids, pos)
    for got, want, plain in zip(first, _hidden(merged, ids, layers), _hidden(base, ids, layers), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - plain).abs().max() > 1e-3  # the adapter changes layer outputs: the choice is real
    with torch.no_grad():  # the policy trains on; its critic must not follow
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    for got, again in zip(first, net(ids, pos), strict=True):
        assert torch.equal(got, again)


# ---------------------------------------------------------------------------------------------
# Quantised bases (bitsandbytes; its CPU backend runs on x86-64 and aarch64)


def test_qlora_trains_and_embeds_with_the_quantised_base(tmp_path, tiny_model_dir, text_file):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ebft.modeling.feature_network import feature_network_for
    from ebft.modeling.policy import load_policy
    from ebft.modeling.tokenizer import load_tokenizer

    config = _config(
        tiny_model_dir,
        text_file,
        adapter="qlora",
        load_in_4bit=True,
        lora_target_modules=SFT_TARGETS,
        max_steps=2,
        learning_rate=1e-3,
    )
    assert main(["train", str(write_run_config(tmp_path, "qlora", config))]) == 0
    saved = load_file(tmp_path / "qlora" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    # lora_B starts at 0. The gradient of a q_proj / v_proj adapter reaches it only through the 4-bit o_proj,
    # after rollouts ran the 4-bit layers in eval mode: every one must have trained (4 layers x 2 modules).
    assert len(lora_b) == 8 and all(float(v.abs().max()) > 0 for v in lora_b.values())

    import bitsandbytes as bnb

    cfg = parse_config(config)
    policy = load_policy(cfg, load_tokenizer(cfg), torch.device("cpu"))

    assert isinstance(policy.get_decoder().layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base4 = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="sdpa", quantization_config=quant
    ).eval()
    for module in base4.modules():  # the same (unrepacked) 4-bit kernel as training; see keep_4bit_layers_...
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)  # a trained adapter; the feature network must not see it
    net = feature_network_for(cfg, policy, torch.device("cpu"))
    ids = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    got = net(ids, torch.arange(10)[None])
    for g, want in zip(got, _hidden(base4, ids, net.layers), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


def test_load_in_8bit_trains(tmp_path, tiny_model_dir, text_file):
    pytest.importorskip("bitsandbytes")
    config = _config(
        tiny_model_dir, text_file, load_in_8bit=True, lora_target_modules=SFT_TARGETS, max_steps=2, learning_rate=1e-3
    )
    assert main(["train", str(write_run_config(tmp_path, "int8", config))]) == 0
    saved = load_file(tmp_path / "int8" / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert len(lora_b) == 8 and all(float(v.abs().max()) > 0 for v in lora_b)  # gradients pass the 8-bit layers


def test_quantised_base_without_bitsandbytes_is_a_clear_error(tmp_path, tiny_model_dir, text_file):
    config = _config(tiny_model_dir, text_file, adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    path = write_run_config(tmp_path, "nobnb", config)
    # A fresh interpreter in which `import bitsandbytes` fails, as on a machine without it.
    script = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'bitsandbytes': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from ebft.cli import main\n"
        f"sys.exit(main(['train', {str(path)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "load_in_4bit: needs bitsandbytes (pip install 'ebft[qlora]')" in done.stderr
