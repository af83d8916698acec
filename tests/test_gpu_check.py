"""benchmarks/gpu_check.py runs on CPU in --dry-run mode (the same code as on a GPU, tiny shapes), reports
what it verified and measured, and fails loudly when an equality check fails."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    """The script's modules, imported the way ``python benchmarks/gpu_check.py`` imports them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    return gpu_check


def _check_keys(report: dict) -> set[tuple[str, str, str]]:
    return {(c["path"], c["quantity"], c["precision"]) for c in report["checks"]}


def test_dry_run_passes_and_reports_every_part(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "PASSED" in res.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "dry-run" and report["passed"] is True
    statuses = {p["name"]: p["status"] for p in report["parts"]}
    assert statuses == {
        "checks": "ok",
        "strided tiny-a lora": "ok",
        "structured tiny-b lora": "ok",
        "hybrid qwen3.5-tiny lora": "ok",
        "strided tiny-a full bf16-weights": "ok",
        "strided tiny-a full": "ok",
        "strided tiny-b lora": "ok",
        "strided tiny-b full": "ok",
        "fsdp2 2 processes": "skipped",
    }
    expected = {("cached decoding (sdpa)", "tokens", "fp32")}
    for precision in ("fp32", "bf16"):
        for path in ("sparse-sdpa", "flex-eager"):
            expected |= {(path, q, precision) for q in ("logits", "logprobs", "features")}
        expected |= {("sparse-sdpa training step", q, precision) for q in ("loss", "logprobs", "gradient")}
    assert _check_keys(report) == expected
    for c in report["checks"]:
        assert math.isfinite(c["error"]) and c["error"] <= c["tolerance"] and c["passed"], c
    runs = {p["name"]: p["result"] for p in report["parts"] if p["status"] == "ok" and p["name"] != "checks"}
    for name, r in runs.items():
        assert r["precision"] == "bf16" and r["timed_steps"] == 1, name
        assert 0 < r["fastest_step_seconds"] <= max(r["step_seconds"]), name
        assert r["tokens_per_second"] > 0 and r["peak_memory_mib"] > 0 and r["mfu"] > 0, name
    # The FLOP count of "strided tiny-a lora", by hand (FLOP_FORMULA): hidden 64, 2 layers, 4 heads of 16,
    # 2 KV heads, MLP 128, vocab 512, LoRA (w = 1), sequence_len 64, 2 documents per step.
    # Weight matrices per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*128 = 36864; x2 = 73728.
    # LM head 512*64 = 32768. Anchors 8, 16, ..., 56 (K = 7, c_k + 8 <= 64); n = 4, g = 8.
    # T = 64 + 8*4*7 = 288; T_head = 7*4*8 generated + 63 CE targets = 287.
    # P = 64*65/2 + 4 * sum_k (8 c_k + 8*9/2) = 2080 + 4 * (8*224 + 7*36) = 2080 + 8176 = 10256.
    # Per document: 4 * (73728*288 + 32768*287) + 12 * 10256 * 64 * 2 = 122552320 + 15753216 = 138305536.
    assert runs["strided tiny-a lora"]["policy_flop_per_step"] == 2 * 138305536
    # Full fine-tuning adds the weight gradients: 6 instead of 4 per multiply-add of the matmuls.
    assert runs["strided tiny-a full"]["policy_flop_per_step"] == 2 * (6 * 30638080 + 15753216)
    assert "12 * P * d_attn" in report["flop_formula"] and report["peak_tflops"] == 989.0
    # No CUDA device: the H200 SXM datasheet row stands in (dense bf16 989 TFLOP/s, HBM 4.8 TB/s).
    assert report["peaks"]["hbm_tb_s"] == 4.8 and report["peaks"]["source"].startswith("NVIDIA datasheet")
    for name, r in runs.items():
        assert set(r["at_limits"]) == {"rollout_and_features", "policy"}, name
        assert all(0 < v["fraction_of_limit"] < 1 for v in r["at_limits"].values()), name
    # bf16-stored weights: the trained weights themselves are bf16 (torch_dtype: bfloat16), not fp32 masters.
    assert runs["strided tiny-a full bf16-weights"]["weights"] == "torch.bfloat16"
    assert runs["strided tiny-a full"]["weights"] == "torch.float32"
    assert "no CUDA" in next(p["reason"] for p in report["parts"] if p["name"] == "fsdp2 2 processes")


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile:UserWarning")
def test_a_failing_equality_check_fails_the_run(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    code = gpu_check.main(["--dry-run", "--parts", "checks", "--selftest-mismatch", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["passed"] is False
    failed = {(c["path"], c["quantity"]) for c in report["checks"] if not c["passed"]}
    # Only the perturbed gradients fail: the packed-row checks of the same run still pass.
    assert failed == {("sparse-sdpa training step", "gradient")}


def test_error_measures_and_exit_status(gpu_check):
    from gpu_check_checks import compare, error_of

    # logits/features: max|diff| / max|want| = 0.5 / 2 = 0.25.
    assert error_of("logits", torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])) == pytest.approx(0.25)
    # log-probs: absolute, in nats: |-2.2 - (-2.0)| = 0.2.
    assert error_of("logprobs", torch.tensor([-1.0, -2.2]), torch.tensor([-1.0, -2.0])) == pytest.approx(0.2)
    # gradient: ||(3, 0)|| / ||(0, 4)|| = 3 / 4.
    assert error_of("gradient", torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0])) == pytest.approx(0.75)
    assert error_of("features", torch.tensor([float("nan")]), torch.tensor([1.0])) == math.inf
    assert compare("logits", "fp32", "p", torch.tensor([1.0]), torch.tensor([1.0005])).passed  # 5e-4 <= 1e-3
    assert not compare("logits", "fp32", "p", torch.tensor([1.0]), torch.tensor([1.01])).passed  # 1e-2 > 1e-3
    ok_part, ok_check = {"status": "ok"}, {"passed": True}
    assert gpu_check.exit_status({"parts": [ok_part, {"status": "skipped"}], "checks": [ok_check]}) == 0
    assert gpu_check.exit_status({"parts": [ok_part], "checks": [ok_check, {"passed": False}]}) == 1
    assert gpu_check.exit_status({"parts": [{"status": "timeout"}], "checks": []}) == 1
    assert gpu_check.exit_status({"parts": [{"status": "error"}], "checks": []}) == 1


def test_fsdp_part_two_processes_match_one_on_cpu(gpu_check, tmp_path):
    """The FSDP part's launch and comparison, with torch.distributed.run and gloo standing in for NCCL."""
    out = tmp_path / "report.json"
    code = gpu_check.main(["--dry-run", "--parts", "fsdp", "--fsdp-cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report["parts"]
    assert {c["quantity"] for c in report["checks"]} == {
        "loss",
        "ebft/alignment",
        "ebft/diversity",
        "ebft/ce_loss",
        "grad_norm",
    }
    assert all(c["passed"] for c in report["checks"])
    result = report["parts"][0]["result"]
    assert len(result["step_seconds_two_processes"]) == 2 and result["peak_memory_mib_two_processes"] > 0


def test_a_part_past_its_cap_is_stopped_and_keeps_its_checks(gpu_check):
    from gpu_check_checks import Check

    cpu = torch.device("cpu")
    report = {"parts": [], "checks": []}

    def slow(_deadline, found):
        found.append(Check("logits", "fp32", "sparse-sdpa", 0.0, 1e-3, True))
        while True:
            time.sleep(0.01)

    gpu_check.run_part(report, "slow", 0.3, slow, time.monotonic() + 100, cpu)
    assert report["parts"][0]["status"] == "timeout" and report["parts"][0]["seconds"] < 5
    assert [c["part"] for c in report["checks"]] == ["slow"]  # made before the cap: still reported
    # Less than MIN_PART (15 s) left before the global deadline: the part does not start.
    gpu_check.run_part(report, "late", 60, slow, time.monotonic() + 20, cpu)
    assert report["parts"][1] == {"name": "late", "cap_seconds": 60, "status": "skipped", "reason": "global deadline"}
    assert gpu_check.exit_status(report) == 1


def test_datasheet_peaks_by_device_name(gpu_check):
    from gpu_check_limits import datasheet_product, peaks

    assert datasheet_product("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert datasheet_product("NVIDIA H100 PCIe") == "H100 PCIe"
    assert datasheet_product("NVIDIA H100 NVL") == "H100 NVL"
    assert datasheet_product("NVIDIA H200") == "H200 SXM"
    assert datasheet_product("NVIDIA H200 NVL") == "H200 NVL"
    assert datasheet_product("NVIDIA A100-SXM4-80GB") is None
    h100 = peaks("NVIDIA H100 80GB HBM3")
    assert (h100["bf16_dense_tflops"], h100["hbm_tb_s"], h100["source"]) == (989.0, 3.35, "NVIDIA datasheet")
    assert peaks("NVIDIA H100 80GB HBM3", tflops=900.0)["bf16_dense_tflops"] == 900.0
    assert "not in the table" in peaks("NVIDIA A100-SXM4-80GB")["source"]
