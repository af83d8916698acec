"""The memory plan of each of axolotl's nine EBFT examples (``tests/axolotl_examples/``) under ebft, on the
hardware the example's header names, and what to change where it does not fit: the table of docs/guide.md
("Memory plan"), printed as markdown.

No weights and no hub: each base model is built on the meta device from its published architecture (below;
Qwen3.5's linear-attention widths are transformers' Qwen3_5TextConfig defaults, those of the 9B, taken for
the 4B too). The headers name how many GPUs the trainer sees (the vLLM server of the structured examples has
a GPU of its own, not planned here); only the 8B example names a memory size (one 32 GB GPU). The others are
planned against a 24 GiB and an 80 GiB GPU.

    PYTHONPATH=src python benchmarks/axolotl_memory_plans.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from ebft.config import load_config
from ebft.modeling.model_shape import model_shape
from ebft.train.memory import Hardware, build_plan, lora_config_for_plan

EXAMPLES = Path(__file__).resolve().parents[1] / "tests" / "axolotl_examples"
GIB = 2**30

# Published architectures of the examples' base models (config.json of each hub repository).
LLAMA = {"model_type": "llama", "vocab_size": 128256, "num_key_value_heads": 8, "max_position_embeddings": 131072}
ARCHITECTURES = {
    "meta-llama/Llama-3.2-1B": LLAMA
    | {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32}
    | {"head_dim": 64, "tie_word_embeddings": True},
    "meta-llama/Llama-3.2-3B": LLAMA
    | {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24}
    | {"head_dim": 128, "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B": LLAMA
    | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32}
    | {"head_dim": 128, "tie_word_embeddings": False},
    "Qwen/Qwen3.5-4B": {"model_type": "qwen3_5_text", "hidden_size": 2560, "intermediate_size": 9216}
    | {"tie_word_embeddings": True},
    "Qwen/Qwen3.5-9B": {"model_type": "qwen3_5_text", "hidden_size": 4096, "intermediate_size": 12288}
    | {"tie_word_embeddings": False},
}


@dataclass(frozen=True)
class Setup:
    """The trainer's hardware as the example's header names it, and the changes to try where it does not fit."""

    gpus: int
    header: str
    memory: tuple[int, ...] = (24 * GIB, 80 * GIB)
    changes: tuple[dict[str, object], ...] = ()


_VLLM = "trainer on 1 GPU (CUDA_VISIBLE_DEVICES=1), vLLM on another"
SETUPS = {
    "llama-1b-ebft-opencode-novllm": Setup(1, "1 GPU"),
    "llama-1b-ebft-opencode": Setup(1, "trainer on 1 GPU, vLLM on another"),
    "llama-1b-ebft-strided-structured": Setup(1, "1 GPU"),
    "llama-1b-ebft-strided": Setup(1, "1 GPU"),
    "llama-3b-ebft-strided-fft": Setup(2, "2 GPUs, one process: policy on GPU 0, feature network on GPU 1"),
    "llama-8b-ebft-strided-fft": Setup(
        1,
        "1 GPU of 32 GB, feature network offloaded to the CPU (the header says so; the config does not)",
        memory=(32 * 10**9, 80 * GIB),
        changes=(
            {"torch_dtype": "bfloat16", "ebft.feature_device": "cpu"},
            {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True},
        ),
    ),
    "qwen35-4b-ebft-structured-async": Setup(1, _VLLM),
    "qwen35-4b-ebft-structured": Setup(1, _VLLM),
    "qwen35-9b-ebft-structured": Setup(1, _VLLM),
}


def _shape(base_model: str, cfg):
    arch = dict(ARCHITECTURES[base_model])
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    return model_shape(config, lora=lora_config_for_plan(cfg))


def _plan(cfg, setup: Setup, shape, memory: int):
    capacities = {f"cuda:{i}": memory for i in range(setup.gpus)} | {"cpu": None}
    return build_plan(cfg, Hardware(setup.gpus, 1, capacities, present=False), shape)


def _apply(cfg, changes: dict[str, object]):
    update, ebft = {}, {}
    for key, value in changes.items():
        if key.startswith("ebft."):
            ebft[key[5:]] = value
        else:
            update[key] = value
    if ebft:
        update["ebft"] = cfg.ebft.model_copy(update=ebft)
    return cfg.model_copy(update=update)


def _devices(plan) -> str:
    return "; ".join(f"{d.device} {d.total / GIB:.1f}" for d in plan.devices)


def _verdicts(plan) -> str:
    parts = []
    for d in plan.devices:
        if d.headroom is None:
            continue
        parts.append(f"fits ({d.headroom / GIB:.1f} left)" if d.headroom >= 0 else f"**by {-d.headroom / GIB:.1f}**")
    return ", ".join(parts)


def rows() -> list[str]:
    out = [
        "| example | model, mode, weights | hardware (header) | planned GiB per device | "
        + "GPU memory: fits / does not fit | what to change |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(EXAMPLES.glob("*.yaml")):
        setup = SETUPS[path.stem]
        cfg = load_config(path)
        shape = _shape(cfg.base_model, cfg)
        weights = "LoRA" if cfg.adapter else "full"
        if cfg.torch_dtype:
            weights += f", torch_dtype {cfg.torch_dtype}"
        plans = [(memory, _plan(cfg, setup, shape, memory)) for memory in setup.memory]
        fits = "; ".join(f"{_size(memory)}: {_verdicts(plan)}" for memory, plan in plans)
        tried = []
        for changes in setup.changes:
            after = [(memory, _plan(_apply(cfg, changes), setup, shape, memory)) for memory in setup.memory]
            written = ", ".join(f"`{k}: {v}`" for k, v in changes.items())
            results = "; ".join(f"{_size(m)}: {_verdicts(p)}" for m, p in after)
            tried.append(f"{written}: {_devices(after[0][1])} GiB ({results})")
        change = "<br>".join(tried) if tried else "nothing"
        out.append(
            f"| `{path.stem}` | {cfg.base_model.split('/')[-1]} ({shape.total_params / 1e9:.2f}B), "
            f"{cfg.ebft.mode}, {weights} | {setup.header} | {_devices(plans[0][1])} | {fits} | {change} |"
        )
    return out


def _size(memory: int) -> str:
    return f"{memory // GIB} GiB" if memory % GIB == 0 else f"{memory / 10**9:.0f} GB"


def main() -> int:
    print("\n".join(rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
