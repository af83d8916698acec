"""How big and how consistent is EBFT's policy gradient against the CE gradient, on the quickstart's setting?

    python benchmarks/quickstart_diagnose.py --docs 6 [--ebft.use_whitening=true ...]

For each of ``--docs`` training documents of the quickstart (SmolLM2-135M-Instruct, LoRA r16, 128-token
windows, the quickstart's EBFT block, overridable with ``--ebft.KEY=VALUE``) it computes, at the base
weights and without any optimizer step:

* g_rl(a), g_rl(b): the gradient of the RL term alone (rl_coef 1, ce_coef 0) from two independent rollout
  seeds of the same document;
* g_ce: the gradient of the mean CE over the document (what SFT follows);

and prints their norms, cos(g_rl(a), g_rl(b)) (near 0: the RL gradient of one document is mostly sampling
noise), cos(g_rl, g_ce), the ratio |ce_coef * g_ce| / |g_rl| (which term steers the EBFT update), and the
rollouts' reward terms. One JSON line per document and a summary go to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_common import make_config, prepare_data, single_thread  # noqa: E402

from ebft.data.collate import collate_documents  # noqa: E402
from ebft.data.load import load_strided_datasets  # noqa: E402
from ebft.losses import token_logprobs  # noqa: E402
from ebft.modeling.feature_network import feature_network_for  # noqa: E402
from ebft.modeling.parts import backbone_of, output_head  # noqa: E402
from ebft.modeling.policy import load_policy  # noqa: E402
from ebft.modeling.tokenizer import load_tokenizer  # noqa: E402
from ebft.strided.step import StridedSettings, count_targets, document_generators, strided_microbatch  # noqa: E402


def parse() -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--data", type=Path, default=Path("/tmp/ebft_quickstart_data"))
    p.add_argument("--corpus", choices=("code", "prose"), default="code")
    p.add_argument("--seed", type=int, default=0)
    args, rest = p.parse_known_args()
    ebft = {}
    for item in rest:
        key, _, value = item.removeprefix("--ebft.").partition("=")
        ebft[key] = json.loads(value)
    return args, ebft


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).clone()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def main() -> None:
    single_thread()
    args, ebft = parse()
    train_path, _ = prepare_data(args.data, args.corpus)
    cfg = make_config(train_path, Path("/tmp/ebft_diag_out"), steps=1, ebft=ebft, seed=args.seed)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg)
    rows = load_strided_datasets(cfg, tokenizer).train
    policy = load_policy(cfg, tokenizer, device)
    features = feature_network_for(cfg, policy, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    rl_only = StridedSettings.from_config(cfg.ebft.model_copy(update={"ce_coef": 0.0, "rl_coef": 1.0}))
    policy.train()
    generator = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(rows), generator=generator)[: args.docs].tolist()
    records = []
    for index in picks:
        batch = collate_documents([rows[index]], tokenizer.pad_token_id)
        totals = count_targets(batch, rl_only)
        grads, sums = [], []
        for seed in (1, 2):
            policy.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            result = strided_microbatch(
                policy, features, batch, rl_only, totals, generators=document_generators(seed, 1, 0, 1, device)
            )
            grads.append(flat_grad(params))
            sums.append({**result.sums, "seconds": time.perf_counter() - t0})
        policy.zero_grad(set_to_none=True)
        mask = batch.labels[:, 1:] != -100
        hidden = backbone_of(policy)(input_ids=batch.input_ids, use_cache=False).last_hidden_state
        logp = token_logprobs(hidden[:, :-1][mask], batch.input_ids[:, 1:][mask], output_head(policy))
        ce = -logp.mean()
        ce.backward()
        g_ce = flat_grad(params)
        s = sums[0]
        samples = s["samples"]
        adv_mean = s["advantage"] / samples
        record = {
            "row": index,
            "rl_norm_a": float(grads[0].norm()),
            "rl_norm_b": float(grads[1].norm()),
            "ce_norm": float(g_ce.norm()),
            "ce_coef_x_ce_norm_over_rl_norm": cfg.ebft.ce_coef * float(g_ce.norm()) / float(grads[0].norm()),
            "cos_rl_a_rl_b": cos(grads[0], grads[1]),
            "cos_rl_ce": cos(grads[0], g_ce),
            "ce": float(ce),
            "alignment": s["alignment"] / samples,
            "diversity": s["diversity"] / samples,
            "reward": s["reward"] / samples,
            "cfm_unbiased": 1 - (s["alignment"] - s["diversity"] / 2) / samples,
            "advantage_std": math.sqrt(max(s["advantage_sq"] / samples - adv_mean**2, 0.0)),
            "seconds_rl_step": s["seconds"],
        }
        records.append(record)
        print(json.dumps(record), flush=True)
    summary = {
        key: (statistics.mean(r[key] for r in records), statistics.stdev(r[key] for r in records) / len(records) ** 0.5)
        for key in records[0]
        if key != "row"
    }
    print(json.dumps({"summary_mean_stderr": summary, "ebft": ebft}), flush=True)


if __name__ == "__main__":
    main()
