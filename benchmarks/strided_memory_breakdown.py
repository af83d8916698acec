"""Where the resident memory of a strided LoRA step on SmolLM2-135M-Instruct goes.

Runs the phases of ``ebft train``'s strided micro-batch in this process (the same calls as
``strided_microbatch``, with the trainer's AdamW), on the config ``benchmarks/strided_memory.py`` writes, and
measures at every phase boundary:

* RSS now (anonymous and file-backed, from /proc/self/status) and the highest RSS during the phase (a
  thread samples /proc/self/statm every 2 ms; torch releases the GIL in its kernels);
* glibc's accounting (mallinfo2): heap bytes in use, heap bytes free but still held by the process, bytes
  in mmapped blocks;
* in the policy pass, the distinct storages autograd saves for backward (a saved_tensors_hooks pack hook),
  split into log-prob chunks (last dimension = vocabulary), parameters (saved by reference) and everything
  else, and the same RSS and mallinfo2 readings at the end of the forward (the last pack before the first
  unpack);
* after the optimizer step, the bytes of the LoRA gradients and of AdamW's state;
* the CPU seconds (user + system) of every phase, which load from other processes affects far less than
  wall time, and at the end each phase's CPU seconds against this machine's limits (its FLOPs and bytes by
  ``benchmarks/roofline.py``, the rates of ``benchmarks/limits.py``: ``--limits FILE``).

    EBFT_CACHE=<workdir>/cache PYTHONPATH=src OMP_NUM_THREADS=1 \\
        python benchmarks/strided_memory_breakdown.py <workdir>/config.yaml --gradient-checkpointing true

(``strided_memory.py --workdir DIR`` leaves the config and the converted model in DIR.) Figures in MiB.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import threading
import time
from pathlib import Path

MIB = 2**20
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / MIB


def heap() -> dict[str, float]:
    """glibc: heap in use, heap free but held (freed blocks the process keeps), mmapped blocks; and RSS split."""
    info = _libc.mallinfo2()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {
        "heap_used": info.uordblks / MIB,
        "heap_free_held": info.fordblks / MIB,
        "mmapped": info.hblkhd / MIB,
        "rss_anon": int(status["RssAnon"].split()[0]) / 1024,
        "rss_file": int(status["RssFile"].split()[0]) / 1024,
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PeakSampler:
    """The highest RSS and the CPU seconds (user + system) since the last ``reset``; a daemon thread samples RSS."""

    def __init__(self, interval: float = 0.002):
        self.peak = rss()
        self.cpu_start = cpu_seconds()
        self._interval = interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.peak = max(self.peak, rss())
            time.sleep(self._interval)

    def reset(self) -> None:
        self.peak = rss()
        self.cpu_start = cpu_seconds()


def report(name: str, sampler: PeakSampler, extra: str = "") -> float:
    """Print the phase's memory readings; returns its CPU seconds."""
    h = heap()
    spent = cpu_seconds() - sampler.cpu_start
    print(
        f"{name:28s} rss {rss():6.0f} (anon {h['rss_anon']:5.0f}, file {h['rss_file']:4.0f})  peak {sampler.peak:6.0f}"
        f"  heap used {h['heap_used']:6.0f} free-held {h['heap_free_held']:6.0f} mmapped {h['mmapped']:6.0f}"
        f"  cpu {spent:5.1f} s {extra}",
        flush=True,
    )
    sampler.reset()
    return spent


class SavedForBackward:
    """Distinct storages saved by the autograd graph, and the process's state at the end of the forward."""

    def __init__(self, vocab: int, parameters: set[int]):
        self.vocab = vocab
        self.parameters = parameters  # data_ptr of every parameter's storage: saved, but no activation
        self.storages: dict[int, tuple[str, int]] = {}
        self.at_forward_end: dict[str, float] = {}
        self.backward_started = False

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.parameters:
            kind = "parameter"
        else:
            kind = "logprob" if t.dim() >= 1 and t.shape[-1] == self.vocab else "activation"
        self.storages[ptr] = (kind, t.untyped_storage().nbytes())
        if not self.backward_started:
            self.at_forward_end = {"rss": rss(), **heap()}
        return t

    def unpack(self, t):
        self.backward_started = True
        return t

    def total(self, kind: str) -> float:
        return sum(n for k, n in self.storages.values() if k == kind) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--gradient-checkpointing", choices=("true", "false"), required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--limits", default=None, help="limits.py's JSON (default: measured quickly at the end)")
    args = parser.parse_args()

    sampler = PeakSampler()
    report("interpreter", sampler)
    import torch

    from ebft.config import load_config
    from ebft.data.collate import collate_documents
    from ebft.data.load import load_strided_datasets
    from ebft.modeling.feature_network import feature_network_for
    from ebft.modeling.policy import load_policy
    from ebft.modeling.tokenizer import load_tokenizer
    from ebft.strided import step as st
    from ebft.train.distributed import Sharding
    from ebft.train.optim import build_optimizer

    report("imports", sampler)
    cfg = load_config(args.config, [f"--gradient_checkpointing={args.gradient_checkpointing}"])
    tok = load_tokenizer(cfg)
    policy = load_policy(cfg, tok, torch.device("cpu"))
    weights = sum(p.numel() * p.element_size() for p in policy.parameters()) / MIB
    report("policy loaded", sampler, f"(parameters {weights:.0f})")
    features = feature_network_for(cfg, policy, torch.device("cpu"))
    report("feature network", sampler)
    data = load_strided_datasets(cfg, tok)
    s = st.StridedSettings.from_config(cfg.ebft)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable)
    policy.train()
    report("data, optimizer", sampler)
    phase_seconds: list[dict] = []
    for step in range(args.steps):
        batch = collate_documents([data.train[step]], tok.pad_token_id)
        totals = st.count_targets(batch, s)
        gens = st.document_generators(cfg.seed, step, 0, 1, "cpu")
        r = st.roll_out(policy, batch, s, generators=gens)
        seconds = {"generation": report(f"step {step}: generation", sampler, f"(packed tokens {r.packed.shape[1]})")}
        scores = st.score_rollouts(features, r.packed, r.plan, r.positions, r.layout, batch.labels, s)
        seconds["features+rewards"] = report(f"step {step}: features", sampler)
        parameters = {p.untyped_storage().data_ptr() for p in policy.parameters()}
        saved = SavedForBackward(policy.config.vocab_size, parameters)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            st._policy_document(
                Sharding(policy), batch, 0, r.layout, r.tokens, scores.advantage, s, totals, None, False
            )
        end = saved.at_forward_end
        seconds["policy fwd+bwd"] = report(
            f"step {step}: policy fwd+bwd",
            sampler,
            f"\n    saved for backward: activations {saved.total('activation'):.0f}, log-prob chunks "
            f"{saved.total('logprob'):.0f} (and parameters {saved.total('parameter'):.0f}, no copy);"
            f" at the end of the forward: rss {end['rss']:.0f}, heap used "
            f"{end['heap_used']:.0f}, free-held {end['heap_free_held']:.0f}, mmapped {end['mmapped']:.0f}",
        )
        optimizer.step()
        state = sum(t.numel() * t.element_size() for v in optimizer.state.values() for t in v.values()) / MIB
        grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None) / MIB
        optimizer.zero_grad(set_to_none=True)
        report(f"step {step}: optimizer", sampler, f"(AdamW state {state:.0f}, LoRA grads {grads:.0f})")
        length = int(batch.lengths[0])
        phase_seconds.append(seconds | {"layout": r.layout, "length": length, "ce": int(totals.ce_tokens)})
    against_limits(policy, cfg, phase_seconds, args.limits)


def against_limits(policy, cfg, phase_seconds: list[dict], limits_file: str | None) -> None:
    """Each phase's CPU seconds (one thread: CPU seconds are what the phase costs, whatever else runs)
    against this machine's limits (benchmarks/roofline.py counts, benchmarks/limits.py rates)."""
    import torch
    from limits import limits_for
    from roofline import (
        ModelShape,
        phase_report,
        strided_feature_calls,
        strided_generation_calls,
        strided_policy_calls,
    )

    from ebft.features import layer_indices

    shape = ModelShape.from_config(policy.config)
    limits = limits_for(shape, torch.get_num_threads(), limits_file)
    depth = max(layer_indices(cfg.ebft.feature_layers, shape.layers))
    for step, p in enumerate(phase_seconds):
        lay = p["layout"]
        L, n, g = p["length"], lay.n, lay.g  # the document's own tokens (not its padding)
        anchors = [lay.anchors[0][lay.valid[0]].tolist()]
        work = {
            "generation": strided_generation_calls(shape, L, anchors, n, g),
            "features+rewards": strided_feature_calls(shape, L, anchors, n, g, depth),
            "policy fwd+bwd": strided_policy_calls(shape, L, anchors, n, g, ce_targets=p["ce"], weights_train=False),
        }
        for name, calls in work.items():
            line = phase_report(name, p[name], calls, shape, limits).line()
            print(f"step {step}, CPU seconds against the limits: {line}")


if __name__ == "__main__":
    main()
