"""The training loop of every mode: accelerate, optimizer, schedule, logging, checkpoints.

The loop knows no mode: a ``Mode`` (``ebft.train.runner``) loads its data and builds its runner, which does
one optimizer step's rollouts, scoring and backward passes over ``gradient_accumulation_steps``
micro-batches of ``micro_batch_size`` on each accelerate process; this loop reduces the step's statistics,
all-reduces gradients, clips, steps, logs and checkpoints. Every loss is divided by step-global counts and
gradients are summed across micro-batches and processes, so 1 x 8 == 8 x 1 == 2 processes x 4 (the
contract in ``ebft.train.runner``).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ebft.config import TrainConfig, dump_config
from ebft.config.evaluation import evaluates
from ebft.deploy.card import FinalModel
from ebft.deploy.export import RunExport
from ebft.errors import ConfigError, EbftError, PolicySyncError, TrainingInterrupted
from ebft.modeling.adapters import warm_start_critic
from ebft.modeling.feature_network import feature_network_for, state_placements
from ebft.modeling.policy import check_model_config, load_policy
from ebft.modeling.precision import autocast_dtype
from ebft.modeling.tokenizer import load_tokenizer
from ebft.train import checkpoint as ckpt
from ebft.train import distributed, preflight
from ebft.train import lock as output_lock
from ebft.train.batches import reduce_sum
from ebft.train.evaluation import Evaluation, held_out_rows
from ebft.train.memory import Hardware, log_plan
from ebft.train.optim import build_optimizer, build_scheduler
from ebft.train.reporting import MetricsLogger, Progress, RolloutLog, peak_memory_bytes
from ebft.train.resume import Launch, check_resume
from ebft.train.runner import Mode, Parts, Runner, StepOutput
from ebft.train.signals import stop_on_signals
from ebft.train.stats import LoopStats, StepStats, Window
from ebft.train.tui import Dashboard, RunInfo

log = logging.getLogger("ebft")


class TooManySkippedSteps(EbftError):
    """Too many consecutive steps had a non-finite loss, reward or gradient."""


@dataclass
class TrainResult:
    """Where the run wrote its model, the optimizer steps done (fewer than the run's total when
    ``time_up`` ended it), and the last logged metrics."""

    output_dir: Path
    steps: int
    last_metrics: dict[str, float]


def _all_reduce_grads(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over processes: each process's loss is already divided by the global token counts."""
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).clone()
        start += n


@dataclass
class Session:
    """Everything the loop works with, made once by ``_set_up``. ``window`` and ``last`` change each
    logged step; ``state`` each step."""

    cfg: TrainConfig
    accelerator: Any
    out_dir: Path
    tokenizer: Any
    model: torch.nn.Module
    runner: Runner[Any]
    sharding: distributed.Sharding
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    state: ckpt.TrainState
    window: Window
    logger: MetricsLogger
    record_log: RolloutLog | None
    export: RunExport  # run card, merge_lora, Hub uploads
    evaluation: Evaluation | None  # evaluation during training, early stopping, the best model
    last: dict[str, float] = field(default_factory=dict)
    lock: output_lock.OutputLock = field(default_factory=output_lock.OutputLock)  # this run's output_dir
    launch: Launch = field(default_factory=Launch)  # the command that started the run

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class StepOutcome:
    """One optimizer step as the loop saw it: the runner's output, its statistics reduced over processes,
    the loop's own (gradient norm before clipping, seconds), the learning rate it used, whether it was
    applied."""

    out: StepOutput[Any]
    stats: StepStats
    loop: LoopStats
    lr: float
    finite: bool
    sync_failed: PolicySyncError | None = None  # the rollout server could not be given this step's policy


def train(
    cfg: TrainConfig,
    mode: Mode,
    *,
    config_dir: Path | None = None,
    console=None,
    time_up: Callable[[int, float], bool] | None = None,
    launch: Launch | None = None,
    dashboard: Dashboard | None = None,
) -> TrainResult:
    """Run (or resume) ``cfg`` in ``mode`` to its last step: set-up, then per step the update, logging and
    checkpoints; the final model is written to output_dir. ``config_dir``: where custom transform modules
    are found. ``time_up(step, seconds)``: asked after each step with the seconds since the first step began;
    True makes that step the last, logged and saved as the last step is; ``TrainResult.steps`` says how many
    ran.
    ``launch``: the command line (for the resume command, and whether a resume may change settings).
    ``dashboard``: an open ``ebft.train.tui.Dashboard`` that draws the run (main process; ``console`` its)."""
    run = _set_up(cfg, mode, config_dir, console, launch or Launch())
    run.model.train()
    runner = run.runner
    drawn = dashboard is not None and run.is_main
    progress = Progress(
        run.total_steps,
        description=runner.label,
        completed=run.state.step,
        is_main=run.is_main,
        console=run.logger.console,
        live=not drawn,
    )
    if drawn and dashboard is not None:
        dashboard.attach(RunInfo(cfg.base_model, runner.label, run.accelerator.num_processes, cfg.output_dir), progress)
        run.logger.add_listener(dashboard)
    word, key = runner.progress_metric
    started = time.perf_counter()
    evaluation = run.evaluation
    try:
        with run.logger, progress as bar, stop_on_signals() as stop:
            if evaluation is not None and evaluation.on_start and run.state.step == 0:
                first = evaluation.run(bar)
                evaluation.observe(0, first)
                _report_evaluation(run, 0, first, stopped=False)
            while run.state.step < run.total_steps:
                step = run.state.step + 1
                outcome = _step(run, step)
                last = step == run.total_steps or _out_of_time(run, step, started, time_up)
                _keep(run, step, outcome)
                metrics: dict[str, float | None] | None = None
                stopped = False
                if evaluation is not None and evaluation.due(step, last):
                    metrics = evaluation.run(bar)
                    stopped = evaluation.observe(step, metrics, last)
                last = last or stopped  # early stopping ends the run as its last step would
                _flush(run, step, outcome.lr, last)
                if metrics is not None:
                    _report_evaluation(run, step, metrics, stopped)
                bar.advance(1, postfix=f"{word} {run.last.get(key, float('nan')):+.3f}")
                _checkpoint_or_stop(run, step, stop, outcome.sync_failed, last)
                if last:
                    break
    except BaseException:
        run.lock.release()  # the kernel releases it when the process ends; a caller may go on before that
        raise
    finally:
        runner.close()
    _finish(run)
    run.lock.release()
    return TrainResult(output_dir=run.out_dir, steps=run.state.step, last_metrics=run.last)


def _report_evaluation(run: Session, step: int, metrics: dict[str, float | None], stopped: bool) -> None:
    run.logger.log_eval(step, metrics)
    if stopped and run.evaluation is not None:
        log.info(run.evaluation.stop_reason())


def _out_of_time(run: Session, step: int, started: float, time_up: Callable[[int, float], bool] | None) -> bool:
    """Whether ``time_up`` says so on any process (so that all of them stop after the same step)."""
    if time_up is None:
        return False
    late = float(time_up(step, time.perf_counter() - started))
    return reduce_sum(run.accelerator, torch.tensor([late], device=run.accelerator.device)).item() > 0


def _set_up(cfg: TrainConfig, mode: Mode, config_dir: Path | None, console, launch: Launch) -> Session:
    """Accelerate, the output folder, model, runner, optimizer and schedule; the checkpoint resumed from."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    preflight.check(cfg, "train", config_dir=config_dir)  # before anything is written or loaded
    if evaluates(cfg) and mode.evaluator is None:
        raise ConfigError("eval_steps: this mode offers no evaluation during training; unset eval_steps")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    out_dir = Path(cfg.output_dir)
    lock = output_lock.lock_output_dir(out_dir, accelerator)  # before anything in the folder is read or written
    resume_dir = ckpt.resume_point(out_dir, cfg.resume_from_checkpoint)
    if resume_dir is not None:  # before any weights load: its files are intact and its settings are this run's
        ckpt.verify(resume_dir, accelerator)
        current = cfg.model_dump(mode="json")
        check_resume(resume_dir, ckpt.saved_config(resume_dir), current, allow_config_change=launch.allow_config_change)
    set_seed(cfg.seed)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))

    check_model_config(cfg)
    if is_main and mode.workload is not None:
        log_plan(cfg, Hardware.here(accelerator.num_processes), mode.workload)
    export = RunExport(cfg, accelerator)  # Hub credentials are checked here, before any weights load
    tokenizer = load_tokenizer(cfg)
    model, runner, sharding, held_out = _build(cfg, mode, tokenizer, accelerator, config_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    total_steps = runner.total_steps()
    scheduler = build_scheduler(cfg, optimizer, total_steps)

    state, window = ckpt.TrainState(), Window()
    if resume_dir is not None:
        state = ckpt.load_checkpoint(
            resume_dir,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            accelerator=accelerator,
            sharded=sharding.sharded,
        )
        ckpt.check_resume_step(resume_dir, state.step, total_steps)
        runner.load(resume_dir, rank)
        window = Window.restored(state.window, runner.stats_type)
        log.info("resuming from %s at step %d", resume_dir, state.step)
    if is_main:  # lines after the resumed step (or, starting over, all) belong to the part being redone
        for name in ("metrics.jsonl", runner.log_name):
            if name is not None:
                ckpt.truncate_jsonl(out_dir / name, state.step)
    runner.start(state)
    evaluation = None
    if held_out is not None:
        evaluator, rows = held_out
        evaluation = Evaluation(
            cfg,
            evaluator,
            accelerator=accelerator,
            model=model,
            sharding=sharding,
            total_steps=total_steps,
            record=state.evaluation,
        )
        log.info(evaluation.describe(rows))

    keep = runner.keep_records and runner.log_name is not None and is_main
    record_log = RolloutLog(out_dir / runner.log_name, decode=tokenizer.decode) if keep else None
    logger = MetricsLogger(
        out_dir,
        use_tensorboard=cfg.use_tensorboard,
        wandb_project=cfg.wandb_project,
        wandb_entity=cfg.wandb_entity,
        wandb_name=cfg.wandb_name,
        config_dict=cfg.model_dump(mode="json"),
        is_main=is_main,
        console=console,
        reward_line=runner.reward_line,
    )
    return Session(
        cfg=cfg,
        accelerator=accelerator,
        out_dir=out_dir,
        tokenizer=tokenizer,
        model=model,
        runner=runner,
        sharding=sharding,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
        state=state,
        window=window,
        logger=logger,
        record_log=record_log,
        export=export,
        lock=lock,
        launch=launch,
        evaluation=evaluation,
    )


def _step(run: Session, step: int) -> StepOutcome:
    """The runner's rollouts and backward passes, then one update: gradients summed over processes,
    clipped, and applied only when the loss, rewards and gradient are finite."""
    cfg, state = run.cfg, run.state
    started = time.perf_counter()
    out = run.runner.run(step, state)
    stats = out.stats.reduced(run.accelerator)
    if not run.sharding.sharded:  # FSDP has already summed (and sharded) them
        _all_reduce_grads(run.accelerator, run.params)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    grad_norm = distributed.clip_grad_norm(run.params, max_norm)
    finite = stats.finite() and math.isfinite(grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
        run.scheduler.step()
        state.consecutive_skips = 0
    else:
        state.skipped_steps += 1
        state.consecutive_skips += 1
        log.warning("step %d: non-finite loss, reward or gradient; update skipped", step)
    run.optimizer.zero_grad(set_to_none=True)
    state.step = step
    try:
        run.runner.after_update(step)
        sync_failed = None
    except PolicySyncError as exc:  # the step stands: it is logged and saved, then the run stops
        sync_failed = exc
    loop = LoopStats(grad_norm=grad_norm, seconds=time.perf_counter() - started)
    return StepOutcome(out, stats, loop, lr, finite, sync_failed)


def _keep(run: Session, step: int, outcome: StepOutcome) -> None:
    """This step's records (gathered from every process, written and shown), and its statistics in the window."""
    from accelerate.utils import gather_object

    runner = run.runner
    if runner.keep_records:
        records = outcome.out.records
        gathered = gather_object(records) if run.accelerator.num_processes > 1 else records
        if run.record_log is not None and gathered:
            ordered = sorted(gathered, key=lambda r: r[runner.record_order])
            run.record_log.append([{"step": step, **r} for r in ordered])
            runner.show_records(run.logger.console, gathered)
            if run.logger.listening:
                run.logger.show_samples(step, runner.previews(ordered))
    if outcome.finite:
        run.window.add(outcome.stats, outcome.loop)


def _flush(run: Session, step: int, lr: float, last: bool) -> None:
    """The window's means, every ``logging_steps`` and at the last step."""
    if step % run.cfg.logging_steps == 0 or last:
        logged = _logged(run.window, run.runner, lr, run.accelerator.device)
        logged["ebft/skipped_steps"] = float(run.state.skipped_steps)
        run.logger.log(step, logged)
        run.last, run.window = logged, Window()


def _checkpoint_or_stop(
    run: Session, step: int, stop: list[int], sync_failed: PolicySyncError | None, last: bool
) -> None:
    """Save every ``save_steps`` (and at the last step, see ``checkpoint_due``); save and stop when the
    rollout server could not be synced, after too many skipped steps, or on a signal (on any process)."""
    cfg, state = run.cfg, run.state
    if sync_failed is not None:
        saved = _save(run, f"checkpoint-{step}")  # the policy is good; only the rollout server is behind
        raise PolicySyncError(
            f"{sync_failed}\nThe policy after step {step} is saved in {saved}; once the server is restarted, "
            f"resume with: {run.launch.resume_command(run.out_dir)}"
        ) from sync_failed
    if state.consecutive_skips >= cfg.max_consecutive_skipped_steps:
        saved = _save(run, f"checkpoint-{step}")
        raise TooManySkippedSteps(
            f"{state.consecutive_skips} consecutive steps had a non-finite loss, reward or gradient "
            f"(last at step {step}); stopped. The last good state is saved in {saved}. Lower the "
            "learning_rate, set max_grad_norm, or check the data."
        )
    flag = torch.tensor([float(bool(stop))], device=run.accelerator.device)
    if reduce_sum(run.accelerator, flag).item() > 0:
        saved = _save(run, f"checkpoint-{step}")
        raise TrainingInterrupted(
            f"interrupted at step {step}; checkpoint saved to {saved}. Resume with: "
            f"{run.launch.resume_command(run.out_dir)}",
            signum=stop[0] if stop else signal.SIGINT,  # another process got the signal: SIGINT's code
        )
    if ckpt.checkpoint_due(step, step if last else run.total_steps, cfg.save_steps, cfg.save_final_checkpoint):
        _save(run, f"checkpoint-{step}")


def _save(run: Session, name: str) -> Path:
    target = run.out_dir / name
    run.state.window = run.window.saved()
    if run.evaluation is not None:  # this checkpoint may become the best model: the record it holds says so
        run.evaluation.checkpointed(run.state.step)
        run.state.evaluation = run.evaluation.record.saved()
    rank = run.accelerator.process_index
    ckpt.save_checkpoint(
        target,
        model=run.model,
        tokenizer=run.tokenizer,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        state=run.state,
        accelerator=run.accelerator,
        config=run.cfg.model_dump(mode="json"),
        extra=lambda tmp: run.runner.save(tmp, rank),
        sharded=run.sharding.sharded,
    )
    if run.is_main:
        protected = run.evaluation.protected(run.out_dir) if run.evaluation is not None else None
        ckpt.rotate(run.out_dir, run.cfg.save_total_limit, protected)
    run.export.checkpoint_saved(target)
    return target


def _finish(run: Session) -> None:
    """The final model (or adapter) and tokenizer in output_dir (with load_best_model_at_end, the best
    checkpoint's weights); the process group torn down; then the run card, merge_lora and the final Hub upload
    (main process)."""
    steps, evaluation = run.state.step, run.evaluation
    chosen = evaluation.final_checkpoint(steps) if evaluation is not None else None
    if chosen is not None:
        best = run.out_dir / f"checkpoint-{chosen}"
        kw = {"model": run.model, "optimizer": run.optimizer, "accelerator": run.accelerator}
        ckpt.load_weights(best, **kw, sharded=run.sharding.sharded)
        log.info("load_best_model_at_end: the final model is %s's, not the last step's (%d)", best.name, steps)
    final = evaluation.final_model(steps, chosen) if evaluation is not None else FinalModel(steps, steps)
    weights = distributed.full_state_dict(run.model) if run.sharding.sharded else None  # a collective
    if run.is_main:
        ckpt.write_model(run.model, run.tokenizer, run.out_dir, state_dict=weights)
    run.accelerator.wait_for_everyone()
    if run.accelerator.num_processes > 1:
        # Tear the process group down while every process is still here: left to interpreter exit, gloo's
        # threads are destroyed in no particular order and a process can abort (SIGABRT) after a good run.
        import torch.distributed as dist

        dist.destroy_process_group()
    run.export.finish(run.out_dir, steps, run.last, final)


def _build(cfg: TrainConfig, mode: Mode, tokenizer, accelerator, config_dir: Path | None):
    """Data, policy, feature network, the policy's sharding and the mode's runner, in the order ``Parts``
    explains; with evaluation during training, the mode's evaluator and what its rows are (else None)."""
    device = accelerator.device
    data = mode.load_data(cfg, tokenizer, search_dir=config_dir)
    rows = held_out_rows(cfg, mode, data, tokenizer, config_dir) if evaluates(cfg) else None
    model = load_policy(cfg, tokenizer, device)
    features = None
    if mode.needs_features:
        features = feature_network_for(
            cfg, model, device, frozen_copy=warm_start_critic(cfg), processes=accelerator.num_processes
        )
        state_placements(features, accelerator)
    sharding = distributed.Sharding(model)
    if cfg.fsdp_version == 2 and accelerator.num_processes > 1:
        fsdp = cfg.fsdp_config
        assert fsdp is not None  # TrainConfig's validation fills it in with fsdp_version: 2
        sharding = distributed.shard(
            model,
            device,
            reshard_after_forward=fsdp.reshard_after_forward,
            layer_class=fsdp.transformer_layer_cls_to_wrap,
        )
        log.info("FSDP2: policy sharded over %d processes", accelerator.num_processes)
    elif cfg.fsdp_version == 2:
        log.warning("fsdp_version: 2 with a single process: nothing to shard, training unsharded")
    parts = Parts(
        cfg=cfg,
        model=model,
        features=features,
        tokenizer=tokenizer,
        data=data,
        accelerator=accelerator,
        autocast_dtype=autocast_dtype(cfg, device),
        sharding=sharding,
    )
    held_out = None
    if rows is not None and mode.evaluator is not None:  # _set_up refuses evaluation in a mode without one
        held_out = (mode.evaluator(parts, rows[0]), rows[1])
    return model, mode.build(parts), sharding, held_out


def _logged(window: Window, runner: Runner[Any], lr: float, device) -> dict[str, float]:
    """The window's metrics: the runner's, then the loop's (empty when no step of the window was applied)."""
    if window.stats is None:
        return {}
    out = runner.metrics(window.stats, window.steps, window.loop.seconds)
    out.update(window.loop.metrics(window.steps, lr, peak_memory_bytes(device)))
    return out
