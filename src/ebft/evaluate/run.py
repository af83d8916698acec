"""``evaluate``: load the models and the held-out rows, run the config's mode, and assemble the result."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ebft.config import TrainConfig
from ebft.errors import EbftError
from ebft.evaluate import metrics as eval_metrics
from ebft.evaluate.execute import EXEC_TIMEOUT
from ebft.evaluate.load import held_out_plan, held_out_rows, load_models
from ebft.evaluate.result import EvalResult, ModeRun
from ebft.evaluate.sandbox import check_sandbox
from ebft.evaluate.strided import run_strided
from ebft.evaluate.structured import run_structured, sampler, summarise_structured
from ebft.modeling.adapters import warm_start_critic
from ebft.modeling.feature_network import feature_network_for
from ebft.modeling.policy import load_warm_start
from ebft.modeling.precision import autocast_dtype
from ebft.structured.hf import HFGenerate
from ebft.train import preflight
from ebft.train.batches import spread_indices
from ebft.train.reporting import Progress

log = logging.getLogger("ebft")

# Lines already logged by this process: the quickstart evaluates the same rows with several checkpoints.
_said: set[str] = set()


def _say_once(line: str) -> None:
    if line not in _said:
        _said.add(line)
        log.info(line)


def evaluate(
    cfg,
    *,
    checkpoint: str | Path | None = None,
    split: str | None = None,
    max_docs: int | None = None,
    execute: bool = False,
    exec_timeout: float = EXEC_TIMEOUT,
    config_dir: str | Path | None = None,
    console=None,
    description: str = "evaluate",
) -> EvalResult:
    """Evaluate ``cfg.base_model`` (or ``checkpoint``) on held-out rows; see the module docstring."""

    structured = cfg.ebft.mode == "structured"
    if execute and not structured:
        raise EbftError(
            "--execute runs the unit tests carried by structured code rows (prompt, ground truth and tests, "
            "ebft.mode: structured); strided documents carry no tests"
        )
    if exec_timeout <= 0:
        raise EbftError(f"--exec-timeout must be > 0 seconds, got {exec_timeout:g}")
    if execute:
        check_sandbox()  # no sandbox, no execution: refused before any weights load
    preflight.check(cfg, "evaluate", config_dir=config_dir)
    what, limit = held_out_plan(cfg, split, max_docs)
    _say_once(f"evaluating on {what}")
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, policy, feature_source, kind = load_models(cfg, checkpoint, device)
    rows, source = held_out_rows(cfg, tokenizer, split, Path(config_dir) if config_dir else None)
    if rows is None or len(rows) == 0:
        raise EbftError(f"no documents to evaluate in the {source}")
    indices = spread_indices(len(rows), limit)
    _say_once(f"evaluating {len(indices)} of the {len(rows)} {source}")
    if execute and not any(rows[i].tests for i in indices):
        raise EbftError(
            "--execute needs rows with unit tests: a `tests` field, e.g. OpenCodeInstruct's unit_tests via "
            f"ebft_opencode.transform; none of the {len(indices)} rows evaluated from the {source} has one"
        )

    amp_dtype = autocast_dtype(cfg, device)

    if warm_start_critic(cfg):  # the run's critic: base + the lora_model_dir adapter, frozen
        feature_source = load_warm_start(cfg, tokenizer, device)
    features = feature_network_for(cfg, feature_source, device, frozen_copy=warm_start_critic(cfg))
    del feature_source  # a separately loaded base model lives on only as the features' frozen copy
    policy.eval()
    scorer = HeldOutScorer(cfg, rows, tokenizer, policy, features, amp_dtype)
    with Progress(len(indices), description=description, console=console) as bar:
        run = scorer.run(indices, bar, execute=execute, timeout=exec_timeout)

    info = {
        "model": {
            "base_model": cfg.base_model,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "kind": kind,
        },
        "data": {"source": source, **run.data},
        "settings": {**run.settings, "seed": cfg.seed},
        "seconds": time.perf_counter() - started,
    }
    if run.execution is not None:
        info["execution"] = run.execution
    if run.notes:
        info["notes"] = run.notes
    return EvalResult(metrics=run.metrics, documents=run.documents, info=info)


class HeldOutScorer:
    """The config's mode's scoring of held-out rows with models already loaded: ``evaluate`` runs it on the
    models it loads, training (``held_out_evaluator``) on the policy as it is and the run's own frozen feature
    network. Scores are sums over rows, so that the shares of several processes add up."""

    def __init__(self, cfg: TrainConfig, rows, tokenizer, policy, features, amp_dtype):
        self.cfg, self.rows, self.tokenizer = cfg, rows, tokenizer
        self.policy, self.features, self.amp_dtype = policy, features, amp_dtype
        self.structured = cfg.ebft.mode == "structured"
        self.backend: HFGenerate | None = (
            None  # structured: the sampler, made at the first call (it logs which one it is)
        )

    def __len__(self) -> int:
        return len(self.rows)

    def run(self, indices: list[int], bar, *, first: int = 0, execute=False, timeout=EXEC_TIMEOUT) -> ModeRun:
        """Rows ``indices`` of the held-out set, which are the evaluated rows from place ``first`` on."""
        cfg, args = self.cfg, (self.tokenizer, self.policy, self.features, self.amp_dtype, bar)
        if self.structured:
            self.backend = self.backend or sampler(cfg, self.tokenizer, self.policy, self.amp_dtype)
            return run_structured(
                cfg, self.rows, indices, *args, execute=execute, timeout=timeout, backend=self.backend
            )
        return run_strided(cfg, self.rows.select(indices), indices, *args, first=first)

    def score(self, indices: list[int], first: int, bar) -> dict[str, float]:
        """The sums of ``run`` (see ``ebft.train.runner.Evaluator``)."""
        return self.run(indices, bar, first=first).sums

    def summarise(self, sums: dict[str, float]) -> dict[str, float | None]:
        """The reported metrics of summed rows: the table of ``ebft evaluate`` without --execute."""
        return summarise_structured(sums) if self.structured else eval_metrics.summarise(sums)


def held_out_evaluator(parts, rows) -> HeldOutScorer:
    """A mode's evaluation during training (``ebft.train.runner.Mode.evaluator``): ``rows`` scored on the
    loop's policy with the run's frozen feature network, which is the base model's, as in ``evaluate``
    (docs/design.md §8), also on resume; with ``ebft.feature_network: warm_start`` the warm-started model."""
    return HeldOutScorer(parts.cfg, rows, parts.tokenizer, parts.model, parts.features, parts.autocast_dtype)
