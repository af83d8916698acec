"""The GPU's limits for ``gpu_check.py``: datasheet peaks, and each timed phase's fraction of them.

The phases' FLOPs and bytes are counted by ``benchmarks/roofline.py`` (the formulas the CPU benchmarks use: the
least work of the step, each decoding call reading every weight once), with the weights' own bytes per
element; the limits are the datasheet's dense bf16 tensor-core rate for every matrix product and its HBM
bandwidth for every byte, so a phase's fraction is sum over its calls of max(FLOPs / peak, bytes / bandwidth),
divided by its measured seconds.
"""

from __future__ import annotations

from roofline import (
    Limits,
    ModelShape,
    phase_report,
    strided_feature_calls,
    strided_generation_calls,
    strided_policy_calls,
    structured_feature_calls,
    structured_generation_calls,
    structured_policy_calls,
)

# NVIDIA datasheet: dense bf16 tensor-core TFLOP/s (the datasheets print twice these, "with sparsity") and HBM
# bandwidth in TB/s.
DATASHEET = {
    "H100 SXM": {"bf16_dense_tflops": 989.0, "hbm_tb_s": 3.35},
    "H100 PCIe": {"bf16_dense_tflops": 756.0, "hbm_tb_s": 2.0},
    "H100 NVL": {"bf16_dense_tflops": 835.0, "hbm_tb_s": 3.9},
    "H200 SXM": {"bf16_dense_tflops": 989.0, "hbm_tb_s": 4.8},
    "H200 NVL": {"bf16_dense_tflops": 835.0, "hbm_tb_s": 4.8},
}
SOURCE = "NVIDIA datasheet"
DEFAULT = "H200 SXM"  # where the device is none of the above (and in the CPU dry run)


def datasheet_product(device_name: str) -> str | None:
    """The DATASHEET entry of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), None if unknown."""
    name = device_name.upper()
    for gpu in ("H200", "H100"):
        if gpu in name:
            if "NVL" in name:
                return f"{gpu} NVL"
            return f"{gpu} PCIe" if "PCIE" in name else f"{gpu} SXM"
    return None


def peaks(device_name: str | None, tflops: float | None = None, tb_s: float | None = None) -> dict:
    """The peaks the report divides by: the device's datasheet entry, each overridden by an explicit value."""
    product = datasheet_product(device_name or "")
    entry = DATASHEET[product or DEFAULT]
    source = SOURCE if product else f"{SOURCE} ({DEFAULT}: the device {device_name!r} is not in the table)"
    return {
        "product": product or DEFAULT,
        "bf16_dense_tflops": tflops if tflops is not None else entry["bf16_dense_tflops"],
        "hbm_tb_s": tb_s if tb_s is not None else entry["hbm_tb_s"],
        "source": source if tflops is None and tb_s is None else f"{source}, overridden on the command line",
    }


def gpu_limits(shape: ModelShape, peak: dict) -> Limits:
    """One rate for every product and row count (the tensor-core peak), one bandwidth."""
    rate = {1: 1000.0 * peak["bf16_dense_tflops"]}  # GFLOP/s
    parts = {"body": rate, "head": rate}
    matmul = {shape.key: {"forward": parts, "input_grad": parts}}
    return Limits(threads=0, bandwidth_gb_s=1000.0 * peak["hbm_tb_s"], matmul=matmul, source=peak["source"])


def phase_fractions(shape: ModelShape, peak: dict, seconds: dict[str, float], work: dict[str, list]) -> dict:
    """For each phase in ``work`` (roofline Calls): TFLOP/s, TB/s, the bound and its fraction of the seconds."""
    limits = gpu_limits(shape, peak)
    out = {}
    for name, calls in work.items():
        r = phase_report(name, seconds[name], calls, shape, limits)
        out[name] = {
            "tflop_s": float(f"{r.flops / max(r.seconds, 1e-12) / 1e12:.4g}"),
            "tb_s": float(f"{r.bytes / max(r.seconds, 1e-12) / 1e12:.4g}"),
            "bound_seconds": float(f"{r.bound:.4g}"),
            "limited_by": "HBM" if r.limited_by == "memory" else "tensor cores",
            "fraction_of_limit": float(f"{r.fraction:.4g}"),
        }
    return out


def strided_at_limits(policy, cfg, device, layout, out: dict, peak: dict, *, micro: int, gas: int) -> dict:
    """The fastest step's rollout + feature phase and policy pass against the datasheet peaks (roofline counts)."""
    from ebft.features import layer_indices
    from ebft.modeling.precision import policy_dtype

    shape = ModelShape.from_config(policy.config)
    wb = policy_dtype(cfg, device).itemsize
    L, n, g = layout.doc_len, layout.n, layout.g
    anchors = [layout.anchors[0][layout.valid[0]].tolist()] * micro
    depth = max(layer_indices(cfg.ebft.feature_layers, shape.layers))
    rollout = strided_generation_calls(shape, L, anchors, n, g, weight_bytes=wb)
    rollout += strided_feature_calls(shape, L, anchors, n, g, depth, weight_bytes=wb)
    work = {
        "rollout_and_features": rollout * gas,
        "policy": strided_policy_calls(
            shape, L, anchors * gas, n, g, ce_targets=L - 1, weights_train=cfg.adapter is None, weight_bytes=wb
        ),
    }
    return phase_fractions(shape, peak, out["phases_of_fastest"], work)


def structured_at_limits(policy, cfg, device, out: dict, peak: dict, sizes: dict) -> dict:
    """The fastest step's rollout + feature phase and policy pass against the datasheet peaks (roofline counts:
    every completion runs to its full length; the CE term reads prompt + ground truth of the same length)."""
    from ebft.features import layer_indices
    from ebft.modeling.parts import backbone_of
    from ebft.modeling.precision import policy_dtype

    shape = ModelShape.of_model(policy.config, backbone_of(policy).layers)
    wb = policy_dtype(cfg, device).itemsize
    P, C = sizes["prompts"], sizes["completion_tokens"]
    prompts = [sizes["prompt_tokens"]] * P
    completions = [[C] * (sizes["completions"] // P)] * P
    depth = max(layer_indices(cfg.ebft.feature_layers, shape.layers))
    rollout = structured_generation_calls(shape, prompts, completions, weight_bytes=wb)
    rollout += structured_feature_calls(shape, prompts, completions, [C] * P, depth, weight_bytes=wb)
    truths = [C] * P if cfg.ebft.ce_coef > 0 else None
    policy_calls = structured_policy_calls(
        shape, prompts, completions, weights_train=cfg.adapter is None, truths=truths, weight_bytes=wb
    )
    return phase_fractions(
        shape, peak, out["phases_of_fastest"], {"rollout_and_features": rollout, "policy": policy_calls}
    )
