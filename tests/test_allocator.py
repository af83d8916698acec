"""``large_blocks_from_mmap``: inside it, big blocks come from mmap (returned to the system when freed);
afterwards glibc's heap serves them again. Observed through glibc's own accounting (mallinfo2).

glibc serves a block of any size from free heap memory when it has a fitting free chunk, and asks the
system (mmap above the threshold) only when it has none; which blocks the heap can serve depends on
everything the process did before. The allocation probes therefore run in a fresh interpreter, whose heap
holds no large free chunks, as an ``ebft train`` process's heap holds none when its first step starts."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ebft.config import parse_config
from ebft.train.allocator import _glibc, large_blocks_from_mmap, thresholds_set_by_user

libc = _glibc()
pytestmark = pytest.mark.skipif(
    libc is None or not hasattr(libc, "mallinfo2"), reason="glibc >= 2.33 only (mallopt, mallinfo2)"
)


_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]  # hblkhd: bytes held in mmapped blocks


def _mmapped_bytes() -> int:
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def _mmapped_by_a_new_tensor(nbytes: int) -> int:
    before = _mmapped_bytes()
    block = torch.empty(nbytes, dtype=torch.uint8)
    grown = _mmapped_bytes() - before
    del block
    return grown


def _in_fresh_process(body: str, *args: str) -> dict:
    """Run ``body`` (code calling this module, imported as ``t``, reading ``sys.argv[1:]``) in a new interpreter;
    it prints one JSON object, returned here."""
    code = f"import json, sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\nimport test_allocator as t\n{body}"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _block_probe() -> dict:
    four_mb = 4 * 2**20
    with large_blocks_from_mmap():
        inside = (_mmapped_by_a_new_tensor(four_mb), _mmapped_by_a_new_tensor(2**20))
    after = (_mmapped_by_a_new_tensor(four_mb), _mmapped_by_a_new_tensor(64 * 2**20))
    return {"inside": inside, "after": after}


def test_big_blocks_are_mmapped_inside_and_heap_allocated_after():
    got = _in_fresh_process("print(json.dumps(t._block_probe()))")
    four_mb = 4 * 2**20
    assert got["inside"][0] >= four_mb
    assert got["inside"][1] == 0  # below the 2 MiB threshold: the heap, as before
    # Restored to glibc's steady state (32 MiB): a 4 MiB block is the heap's again, a 64 MiB one mmapped.
    assert got["after"][0] == 0
    assert got["after"][1] >= 64 * 2**20


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, False),  # tunes something else
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, True),
    ],
)
def test_thresholds_set_by_user(environ, expected):
    assert thresholds_set_by_user(environ) is expected


def test_a_threshold_the_user_set_is_left_alone():
    """glibc reads MALLOC_MMAP_THRESHOLD_ at start-up, hence a fresh process. With the user's 16 MiB
    threshold, a 4 MiB block stays on the heap inside the block too (it would be mmapped without it)."""
    code = textwrap.dedent(
        f"""
        import ctypes, torch
        from ebft.train.allocator import _glibc, large_blocks_from_mmap
        fields = {_FIELDS!r}
        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in fields]
        libc = _glibc()
        libc.mallinfo2.restype = Info
        with large_blocks_from_mmap():
            before = libc.mallinfo2().hblkhd
            block = torch.empty(4 * 2**20, dtype=torch.uint8)
            print(libc.mallinfo2().hblkhd - before)
        """
    )
    for user_threshold, expect_mmapped in ((None, True), (str(16 * 2**20), False)):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        if user_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = user_threshold
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert (int(out.stdout.split()[-1]) >= 4 * 2**20) is expect_mmapped, (user_threshold, out.stdout)


def _strided_probe(model_dir: str) -> dict:
    """Whether a 4 MiB block is mmapped at each save (pack hook) and each read-back (unpack hook) of
    autograd's saved tensors during one strided micro-batch of the tiny model."""
    from ebft.data.collate import collate_documents
    from ebft.modeling.feature_network import feature_network_for
    from ebft.modeling.policy import load_policy
    from ebft.modeling.tokenizer import load_tokenizer
    from ebft.strided.step import StridedSettings, count_targets, strided_microbatch

    cfg = parse_config(
        {
            "base_model": model_dir,
            "rl": "ebft",
            "ebft": {"mode": "strided", "stride": 4, "context_length": 4, "feature_layers": [0.25, 0.5]},
            "datasets": [{"path": "unused.jsonl"}],
            "adapter": "lora",
            "lora_target_linear": True,
            "bf16": False,
        }
    )
    tok = load_tokenizer(cfg)
    policy = load_policy(cfg, tok, torch.device("cpu"))
    features = feature_network_for(cfg, policy, torch.device("cpu"))
    policy.train()
    s = StridedSettings.from_config(cfg.ebft)
    ids = torch.randint(5, 300, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = collate_documents([{"input_ids": ids, "labels": ids}], tok.pad_token_id)
    in_forward, in_backward = [], []

    def pack(t):
        in_forward.append(_mmapped_by_a_new_tensor(4 * 2**20) > 0)
        return t

    def unpack(t):
        in_backward.append(_mmapped_by_a_new_tensor(4 * 2**20) > 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        strided_microbatch(policy, features, batch, s, count_targets(batch, s))
    return {"forward": in_forward, "backward": in_backward}


def test_the_strided_policy_forward_and_not_its_backward_runs_with_big_blocks_from_mmap(tiny_model_dir):
    """Inside ``strided_microbatch``: a 4 MiB block allocated while the policy forward saves tensors for
    backward (pack hook) is mmapped; one allocated while the backward reads them back (unpack hook) is not."""
    got = _in_fresh_process("print(json.dumps(t._strided_probe(sys.argv[1])))", str(tiny_model_dir))
    in_forward, in_backward = got["forward"], got["backward"]
    # Every save of the forward; the last save is the loss's product with the advantages, formed after it.
    assert len(in_forward) > 1 and all(in_forward[:-1]) and not in_forward[-1]
    assert in_backward and not any(in_backward)
