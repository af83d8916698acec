"""torch_dtype: the dtypes of weights, gradients and optimizer state are what the config says, one AdamW
step in bf16 is the hand-computed one, and bf16 weights survive saving, resuming, merging and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stdlib_texts
from safetensors import safe_open

from ebft.cli import main
from ebft.config import parse_config
from ebft.errors import ConfigError
from ebft.modeling.feature_network import feature_network_for
from ebft.modeling.policy import load_policy
from ebft.modeling.precision import describe, feature_dtype, policy_dtype, run_dtypes
from ebft.modeling.tokenizer import load_tokenizer
from ebft.train.optim import build_optimizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rows = [{"text": t[:3000]} for t in stdlib_texts(12) if len(t) >= 2000]
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _raw(model_dir, data, **top) -> dict:
    config = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "strided", "stride": 8, "context_length": 8, "generate_max_len": 8, "n_samples_per_prompt": 2},
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 1,
        "max_steps": 1,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "bf16": False,
        "seed": 0,
    }
    config.update(top)
    return config


def _write(tmp_path: Path, name: str, config: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / name)}), encoding="utf-8")
    return path


def _float_dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        tensors = [f.get_tensor(name) for name in list(f.keys())]
    return {t.dtype for t in tensors if t.is_floating_point()}


def test_float16_is_refused_with_the_reason(tiny_model_dir, text_file):
    with pytest.raises(ConfigError, match=r"torch_dtype: float16 weights need loss scaling .* use bfloat16"):
        parse_config(_raw(tiny_model_dir, text_file, torch_dtype="float16"))
    with pytest.raises(ConfigError, match="torch_dtype"):
        parse_config(_raw(tiny_model_dir, text_file, torch_dtype="bf16"))


@pytest.mark.parametrize(
    ("torch_dtype", "adapter", "bf16", "expected"),
    [
        # (policy weights, compute, frozen feature copy)
        (None, None, False, (torch.float32, torch.float32, torch.float32)),  # fp32 master weights, fp32 copy
        (None, None, True, (torch.float32, torch.bfloat16, torch.bfloat16)),  # autocast; copy stored as computed
        (None, "lora", True, (torch.bfloat16, torch.bfloat16, torch.bfloat16)),  # frozen base in bf16
        (None, "lora", False, (torch.float32, torch.float32, torch.float32)),
        ("bfloat16", None, True, (torch.bfloat16, torch.bfloat16, torch.bfloat16)),
        ("bfloat16", None, False, (torch.bfloat16, torch.bfloat16, torch.bfloat16)),  # no autocast: bf16 compute
        ("float32", "lora", True, (torch.float32, torch.bfloat16, torch.bfloat16)),  # fp32 base kept under LoRA
    ],
)
def test_run_dtypes(tiny_model_dir, text_file, torch_dtype, adapter, bf16, expected):
    extra = {"adapter": adapter, "lora_target_linear": True} if adapter else {}
    cfg = parse_config(_raw(tiny_model_dir, text_file, torch_dtype=torch_dtype, bf16=bf16, **extra))
    assert run_dtypes(cfg, bf16) == expected
    # On this CPU, bf16: true is autocast on the CPU; policy_dtype and feature_dtype follow run_dtypes.
    assert (policy_dtype(cfg, CPU), feature_dtype(cfg, CPU)) == (expected[0], expected[2])


def test_adamw_step_on_bf16_weights_is_the_hand_computed_one():
    """Step 1 of AdamW (no weight decay): m = (1 - b1) g, v = (1 - b2) g^2, update = lr * (m / (1 - b1)) /
    (sqrt(v / (1 - b2)) + eps) = lr * g / (|g| + eps), i.e. lr * sign(g) = 0.01 here. In fp32 that gives
    1.0 -> 0.99 and -2.0 -> -1.99; bf16 stores 8 significant bits, so 0.99 rounds to 253/256 = 0.98828125
    (spacing 2^-8 in [0.5, 1): 0.99 * 256 = 253.44) and -1.99 to -255/128 = -1.9921875 (spacing 2^-7 in [1, 2):
    1.99 * 128 = 254.72). The moments are bf16 too: m = 0.1 * g, v = 0.001 * g^2, rounded."""
    cfg = parse_config(_raw("unused", "unused.jsonl", learning_rate=0.01, torch_dtype="bfloat16"))
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    param.grad = torch.tensor([0.5, -0.25], dtype=torch.bfloat16)
    optimizer = build_optimizer(cfg, [param])
    optimizer.step()
    assert param.dtype == torch.bfloat16
    assert param.detach().tolist() == [0.98828125, -1.9921875]
    state = optimizer.state[param]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["exp_avg"].float().tolist() == pytest.approx([0.05, -0.025], rel=2**-8)
    assert state["exp_avg_sq"].float().tolist() == pytest.approx([0.00025, 0.0000625], rel=2**-8)


def test_bf16_policy_trains_in_bf16_and_matches_an_fp32_reference_rounded_to_bf16(tiny_model_dir, text_file):
    """The tiny model loaded with torch_dtype: bfloat16: every parameter, gradient and AdamW moment is bf16, and
    one step (lr 1e-3, weight decay 0.1) equals AdamW computed in fp32 from the same bf16 weights and gradients
    and rounded to bf16, to within 2 bf16 steps of the larger of the weight and the update (torch's bf16 AdamW
    rounds its intermediates)."""
    raw = _raw(tiny_model_dir, text_file, torch_dtype="bfloat16", weight_decay=0.1)
    cfg = parse_config(raw)
    tokenizer = load_tokenizer(cfg)
    policy = load_policy(cfg, tokenizer, CPU)
    params = [p for p in policy.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.bfloat16}
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    assert {p.grad.dtype for p in params} == {torch.bfloat16}
    before = [(p.detach().float().clone(), p.grad.float().clone()) for p in params]
    optimizer = build_optimizer(cfg, params)
    optimizer.step()
    lr, wd, (b1, b2), eps = 1e-3, 0.1, (0.9, 0.999), 1e-8
    for p, (w, g) in zip(params, before, strict=True):
        assert optimizer.state[p]["exp_avg"].dtype == optimizer.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        m, v = (1 - b1) * g, (1 - b2) * g * g
        want = (w * (1 - lr * wd) - lr / (1 - b1) * m / ((v / (1 - b2)).sqrt() + eps)).to(torch.bfloat16).float()
        # One bf16 step at the size of the numbers subtracted (the weight and the update, about lr): where
        # they cancel, torch's rounded intermediates are off by that much, not by a step at |result|.
        scale = torch.maximum(w.abs(), want.abs()).clamp_min(lr)
        step = 2.0 ** (torch.floor(torch.log2(scale)) - 7)
        assert bool(((p.detach().float() - want).abs() <= 2 * step).all())
    moved = sum(int((p.detach().float() != w).sum()) for p, (w, _) in zip(params, before, strict=True))
    assert moved > 0.5 * sum(p.numel() for p in params)


def test_lora_keeps_fp32_adapters_over_a_bf16_base_and_a_frozen_copy_in_bf16(tiny_model_dir, text_file):
    raw = _raw(tiny_model_dir, text_file, torch_dtype="bfloat16", adapter="lora", lora_r=4, lora_target_linear=True)
    cfg = parse_config(raw)
    policy = load_policy(cfg, load_tokenizer(cfg), CPU)
    trained = {p.dtype for p in policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in policy.parameters() if not p.requires_grad}
    assert (trained, frozen) == ({torch.float32}, {torch.bfloat16})
    # A warm-start-style frozen copy (full fine-tuning elsewhere) is stored in the feature dtype: bf16 here.
    full = parse_config(_raw(tiny_model_dir, text_file, torch_dtype="bfloat16"))
    features = feature_network_for(full, load_policy(full, load_tokenizer(full), CPU), CPU)
    assert {p.dtype for p in features.body.parameters()} == {torch.bfloat16}
    assert features.body.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their dtype


def test_describe_states_the_optimizer_state_precision(tiny_model_dir, text_file):
    cfg = parse_config(_raw(tiny_model_dir, text_file, torch_dtype="bfloat16"))
    assert describe(cfg, False) == (
        "precision: trained weights bfloat16 (torch_dtype, no float32 master copy); gradients in the parameter "
        "dtype; AdamW moments bfloat16 (the parameter dtype); compute bfloat16 (no autocast)"
    )
    lora = parse_config(_raw(tiny_model_dir, text_file, adapter="lora", lora_target_linear=True, bf16=True))
    assert describe(lora, True) == (
        "precision: frozen base bfloat16 (default), LoRA adapters float32; gradients in the parameter dtype; "
        "AdamW moments float32 (the parameter dtype); compute bfloat16 autocast"
    )


def test_bf16_full_fine_tune_saves_resumes_and_evaluates_in_bf16(tmp_path, tiny_model_dir, text_file):
    """Through the CLI: the saved model and the checkpoint's optimizer state are bf16; a resumed run continues
    in bf16; ebft evaluate loads the checkpoint in bf16."""
    raw = _raw(tiny_model_dir, text_file, torch_dtype="bfloat16", max_steps=1, save_steps=1, save_final_checkpoint=True)
    path = _write(tmp_path, "bf16", raw)
    assert main(["train", str(path)]) == 0
    out = tmp_path / "bf16"
    assert _float_dtypes(out / "model.safetensors") == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    state = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=False)["state"]
    moments = {t.dtype for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")}
    assert moments == {torch.bfloat16}
    assert main(["train", str(path), "--max_steps=2", "--resume_from_checkpoint=latest"]) == 0
    assert _float_dtypes(out / "model.safetensors") == {torch.bfloat16}
    first = safe_open(str(out / "checkpoint-1" / "model.safetensors"), framework="pt")
    last = safe_open(str(out / "model.safetensors"), framework="pt")
    names = list(first.keys())
    assert any(not torch.equal(first.get_tensor(k), last.get_tensor(k)) for k in names)
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(path), "--checkpoint", str(out), "--max-docs", "1", "--output", str(report)]) == 0
    assert json.loads(report.read_text())["metrics"]


def test_lora_run_with_bf16_base_saves_fp32_adapters_and_merges_in_bf16(tmp_path, tiny_model_dir, text_file):
    raw = _raw(
        tiny_model_dir,
        text_file,
        torch_dtype="bfloat16",
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_target_linear=True,
        merge_lora=True,
    )
    assert main(["train", str(_write(tmp_path, "lora", raw))]) == 0
    out = tmp_path / "lora"
    assert _float_dtypes(out / "adapter_model.safetensors") == {torch.float32}
    # The base folder is fp32 (the tiny model is saved in fp32); the merged model is saved in torch_dtype.
    assert _float_dtypes(tiny_model_dir / "model.safetensors") == {torch.float32}
    assert _float_dtypes(out / "merged" / "model.safetensors") == {torch.bfloat16}
