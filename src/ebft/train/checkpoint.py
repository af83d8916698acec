"""Checkpoints that survive crashes and resume exactly.

A checkpoint folder ``checkpoint-N`` holds the model (or LoRA adapter) and tokenizer in HF format,
plus everything needed to continue as if never stopped: optimizer, scheduler, every process's RNG
states, the data position and the step. It is written into ``checkpoint-N.tmp`` and renamed, so a
crash mid-save leaves the previous checkpoints intact.

Under FSDP (``sharded=True``) the weights and the optimizer state are gathered whole onto the main
process, which writes the same HF files; the optimizer state is then keyed by parameter name (not
by position), so such a checkpoint resumes only a sharded run. Loading reads on the main process and
broadcasts.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ebft.errors import ConfigError
from ebft.train import distributed

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, micro-batches consumed, faults seen."""

    step: int = 0
    data_position: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    window: dict = field(default_factory=dict)  # metric sums since the last logged step
    evaluation: dict = field(default_factory=dict)  # what evaluations decided (ebft.train.early_stopping)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_model(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """The model (or LoRA adapter) and tokenizer in HF format; ``state_dict``: the full weights of a
    sharded model (``distributed.full_state_dict``), None to read them from the model."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


def save_checkpoint(
    directory: Path,
    *,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: TrainState,
    accelerator,
    extra=None,
    sharded: bool = False,
) -> None:
    """Write ``directory`` atomically. Every process writes its RNG state (and, through ``extra(tmp)``,
    whatever else its mode keeps, e.g. a rollout batch still to be reused); the main process the rest."""
    tmp = directory.with_name(directory.name + ".tmp")
    weights = optim_state = None
    if sharded:  # collectives: every process takes part, the main process receives the whole
        weights = distributed.full_state_dict(model)
        optim_state = distributed.full_optimizer_state_dict(model, optimizer)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        write_model(model, tokenizer, tmp, state_dict=weights)
        torch.save(optim_state if sharded else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    accelerator.wait_for_everyone()


def checkpoint_due(step: int, total_steps: int, save_steps: int | None, save_final: bool) -> bool:
    """Whether optimizer step ``step`` of ``total_steps`` ends with a ``checkpoint-N``: every ``save_steps``,
    the last step included (so a finished run can be extended), and the last step always with ``save_final``."""
    if step == total_steps and save_final:
        return True
    return bool(save_steps) and step % save_steps == 0


def check_resume_step(directory: Path, step: int, total_steps: int) -> None:
    """A checkpoint beyond the run's last step cannot be continued: say so instead of training nothing."""
    if step > total_steps:
        raise ConfigError(
            f"resume_from_checkpoint: {directory.name} is at step {step}, beyond this run's {total_steps} steps "
            "(max_steps, or num_epochs); raise max_steps to extend the run"
        )


def continue_schedule(scheduler) -> None:
    """Set the optimizer's learning rates to this run's schedule at the restored step.

    The schedule is rebuilt from this run's settings before the checkpoint loads, and the checkpoint
    restores only its position. Resumed with the same settings this gives exactly the saved learning
    rates; resumed with a larger max_steps (an extended run) it gives the longer schedule's rates from
    the restored step on, instead of the rate the shorter schedule ended at. One step back and one
    forward makes the scheduler recompute them (and its get_last_lr) for the current step.
    """
    scheduler.last_epoch -= 1
    scheduler.step()


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).exists()]


def rotate(output_dir: Path, keep: int | None, protected: Path | None = None) -> None:
    """Delete the oldest checkpoints beyond ``keep``, never ``protected`` (the best one, for
    load_best_model_at_end): it counts among the ``keep``, and with ``keep`` 1 the newest stays beside it (as in
    transformers), since resuming needs it."""
    if keep is None:
        return
    found = checkpoints(output_dir)
    if protected is not None and protected in found:
        found.remove(protected)
        keep = max(keep - 1, 1)
    for old in found[:-keep]:
        shutil.rmtree(old)


def resolve_resume(output_dir: Path, setting: str | None) -> Path | None:
    """The checkpoint folder named by ``resume_from_checkpoint`` (``latest``: the newest in output_dir)."""
    if setting is None:
        return None
    if setting == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise ConfigError(f"resume_from_checkpoint: latest, but {output_dir} holds no checkpoint-N folder")
        return found[-1]
    path = Path(setting)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"resume_from_checkpoint: {setting} is not a checkpoint folder (no {STATE_FILE})")
    return path


def load_weights(directory: Path, *, model, optimizer, accelerator, sharded: bool = False) -> None:
    """The model's weights (or adapter) from checkpoint ``directory``; under FSDP also the optimizer's state,
    which is read and broadcast with them (a collective: every process calls it)."""
    from safetensors.torch import load_file

    adapter = directory / "adapter_model.safetensors"
    if sharded:
        _load_sharded(directory, model, optimizer, accelerator.is_main_process)
    elif adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
    else:
        weights = {}
        for shard in sorted(directory.glob("model*.safetensors")):
            weights.update(load_file(shard))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            raise ConfigError(f"resume_from_checkpoint: {directory} does not match this model's weights")


def load_checkpoint(directory: Path, *, model, optimizer, scheduler, accelerator, sharded: bool = False) -> TrainState:
    """Restore weights, optimizer, scheduler and this process's RNG states; return the saved state."""
    load_weights(directory, model=model, optimizer=optimizer, accelerator=accelerator, sharded=sharded)
    if not sharded:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
    continue_schedule(scheduler)
    rng_file = directory / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))


def _load_sharded(directory: Path, model, optimizer, is_main: bool) -> None:
    """Weights and optimizer state of a sharded run: the main process reads the files, FSDP broadcasts.

    Every process checks the names first (from the file headers, cheap), so a mismatch stops all of
    them instead of leaving the others waiting in the broadcast."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter = directory / "adapter_model.safetensors"
    files = [adapter] if adapter.exists() else sorted(directory.glob("model*.safetensors"))
    rename = distributed.adapter_key_to_module_key if adapter.exists() else (lambda key: key)
    names = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            names.update(rename(key) for key in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    expected = set(model.state_dict())
    missing = set() if adapter.exists() else {k for k in expected - names if not k.endswith("lm_head.weight")}
    if not files or names - expected or missing:
        raise ConfigError(f"resume_from_checkpoint: {directory} does not match this model's weights")
    weights, optim_state = {}, {}
    if is_main:
        for path in files:
            weights.update({rename(key): value for key, value in load_file(path).items()})
        optim_state = torch.load(directory / "optimizer.pt", weights_only=False)
    distributed.load_full_state(model, optimizer, weights, optim_state)


def run_in_progress(output_dir: Path) -> list[str]:
    """What in ``output_dir`` shows that another run already wrote there."""
    if not output_dir.is_dir():
        return []
    marks = [p.name for p in (output_dir / "metrics.jsonl", output_dir / STATE_FILE) if p.exists()]
    return marks + [p.name for p in checkpoints(output_dir)]


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (they belong to the part of the run being redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
