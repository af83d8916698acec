"""Typed step statistics: addition, reduction across processes, finiteness, the checkpoint's window, and each
mode's mapping to its logged metric names (hand-computed values)."""

from __future__ import annotations

import math
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ebft.sft.step import SftStats
from ebft.strided.stats import StridedStats
from ebft.structured.stats import StructuredStats
from ebft.train.stats import LoopStats, Window


def test_sums_add_and_minima_take_the_smaller():
    a = StructuredStats(samples=4.0, reward=1.5, is_ratio_min=0.5, is_tokens=3.0)
    b = StructuredStats(samples=2.0, reward=-0.5, is_ratio_min=0.25)
    total = a + b
    assert (total.samples, total.reward, total.is_tokens, total.is_ratio_min) == (6.0, 1.0, 3.0, 0.25)
    assert StructuredStats().is_ratio_min == math.inf and (a + StructuredStats()) == a  # zero is the identity
    with pytest.raises(TypeError):
        a + StridedStats()


def test_finite_checks_the_sums_not_an_unseen_minimum():
    assert StructuredStats(loss=1.0).finite()  # is_ratio_min is inf: nothing was seen
    assert not StructuredStats(loss=math.nan).finite()
    assert not StridedStats(reward=math.inf).finite()


def test_one_process_reduces_to_itself():
    stats = StridedStats(samples=3.0, alignment=0.1)
    one = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    assert stats.reduced(one) == stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Accelerator:
    """The part of accelerate's Accelerator that a reduction uses, over a plain gloo group."""

    def __init__(self):
        self.num_processes, self.device, self.reduce_calls = 2, torch.device("cpu"), 0

    def reduce(self, values: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        self.reduce_calls += 1
        values = values.clone()
        dist.all_reduce(values)
        return values


def _reduce_on(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        acc = _Accelerator()
        # Rank 0 saw sampler ratios down to 0.5; rank 1 saw none (its minimum stays inf).
        local = StructuredStats(samples=4.0 + rank, reward=[1.25, -0.5][rank], is_ratio_min=[0.5, math.inf][rank])
        total = local.reduced(acc)
        results[rank] = (total.samples, total.reward, total.is_ratio_min, total.loss, acc.reduce_calls)
    finally:
        dist.destroy_process_group()


def test_two_processes_sum_the_sums_and_minimise_the_minima():
    results = mp.Manager().dict()
    mp.spawn(_reduce_on, args=(_free_port(), results), nprocs=2)
    # samples 4 + 5, reward 1.25 - 0.5, min(0.5, inf); one sum collective for all the sums (and one min).
    assert results[0] == results[1] == (9.0, 0.75, 0.5, 0.0, 1)


def test_window_saves_and_restores_the_checkpoint_format():
    window = Window()
    window.add(StridedStats(samples=2.0, loss=0.5), LoopStats(grad_norm=1.0, seconds=2.0))
    window.add(StridedStats(samples=3.0, loss=0.25), LoopStats(grad_norm=3.0, seconds=1.0))
    saved = window.saved()
    assert saved["steps"] == 2 and saved["sums"]["samples"] == 5.0 and saved["sums"]["grad_norm"] == 4.0
    assert Window.restored(saved, StridedStats) == window
    assert Window.restored({}, StridedStats) == Window()  # a fresh run's state has no window
    # A window written before the statistics were typed: the same names in one dict, minima included.
    old = {
        "sums": {"samples": 8.0, "is_ratio_min": 0.5, "is_tokens": 2.0, "grad_norm": 1.5, "seconds": 3.0},
        "steps": 2,
    }
    restored = Window.restored(old, StructuredStats)
    assert restored.stats == StructuredStats(samples=8.0, is_ratio_min=0.5, is_tokens=2.0)
    assert restored.loop == LoopStats(grad_norm=1.5, seconds=3.0) and restored.steps == 2


def test_strided_metrics_by_hand():
    # 4 samples in 2 blocks of 1 document; advantages sum 2, squares 2: mean 0.5, std sqrt(0.5 - 0.25) = 0.5.
    stats = StridedStats(
        blocks=2, docs=1, samples=4, alignment=3.0, diversity=1.0, reward=2.0, advantage=2.0, advantage_sq=2.0,
        cfm=0.5, rl_sum=6.0, rl_tokens=12, ce_sum=10.0, ce_tokens=20, doc_tokens=28,
    )  # fmt: skip
    out = stats.metrics(rl_coef=1.0, ce_coef=0.5, seconds=2.0)
    assert out == {
        "ebft/alignment": 0.75,
        "ebft/diversity": 0.25,
        "ebft/mean_reward": 0.5,
        "ebft/cfm_loss": 0.25,
        "ebft/rl_loss": 0.5,  # 6 / 12 generated tokens
        "ebft/advantages_std": 0.5,
        "ebft/num_blocks": 2.0,
        "ebft/ce_loss": 0.5,  # 10 / 20 targets
        "loss": 0.75,  # 1.0 x 0.5 + 0.5 x 0.5
        "tokens_per_second": 20.0,  # (28 + 12) / 2 s
    }
    assert "ebft/ce_loss" not in stats.metrics(rl_coef=1.0, ce_coef=0.0, seconds=2.0)


def test_structured_metrics_by_hand():
    stats = StructuredStats(
        samples=4, groups=2, reward=2.0, reward_sq=2.0, rl_loss=0.6, rl_tokens=10, entropy=5.0, clip_low=1.0,
        completion_tokens=30, truncated=1, loss=0.8, ce_sum=3.0, ce_tokens=6, skipped_micro_batches=1.0,
    )  # fmt: skip
    out = stats.metrics(2, 3.0, ce=True, skipping=True)
    # reward mean 0.5, std sqrt(2/4 - 0.25) = 0.5; per-step means over 2 steps; per-token means over 10 tokens.
    assert out["ebft/reward"] == 0.5 and out["ebft/reward_std"] == 0.5
    assert out["ebft/rl_loss"] == 0.3 and out["loss"] == 0.4 and out["skipped_micro_batches"] == 0.5
    assert out["entropy"] == 0.5 and out["clip_ratio/low_mean"] == 0.1 and out["ebft/ce_loss"] == 0.5
    assert out["completions/mean_length"] == 7.5 and out["completions/clipped_ratio"] == 0.25
    assert out["tokens_per_second"] == 10.0  # 30 tokens / 3 s
    assert "is_ratio/mean" not in out  # no token had sampler log-probs
    plain = stats.metrics(2, 3.0, ce=False, skipping=False)
    assert "ebft/ce_loss" not in plain and "skipped_micro_batches" not in plain
    sampled = StructuredStats(is_ratio_sum=3.0, is_tokens=4, is_ratio_min=0.5).metrics(1, 1.0, ce=False, skipping=False)
    assert (sampled["is_ratio/mean"], sampled["is_ratio/min"]) == (0.75, 0.5)


def test_sft_and_loop_metrics_by_hand():
    out = SftStats(ce_sum=9.0, targets=6, tokens=40).metrics(seconds=4.0)
    assert out == {"loss": 1.5, "ce_loss": 1.5, "tokens_per_second": 10.0}
    loop = LoopStats(grad_norm=3.0, seconds=1.5).metrics(3, learning_rate=1e-3, peak_memory_bytes=3 * 2**20)
    assert loop == {"grad_norm": 1.0, "learning_rate": 1e-3, "step_seconds": 0.5, "peak_memory_mib": 3.0}
