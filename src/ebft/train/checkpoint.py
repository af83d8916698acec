"""Checkpoints that survive crashes, resume exactly, and cannot run code.

A checkpoint folder ``checkpoint-N`` holds the model (or LoRA adapter) and tokenizer in HF format,
plus everything needed to continue as if never stopped: optimizer, scheduler, every process's RNG
states, the data position and the step, and the run's resolved config (``train_config.json``, which
``train.resume`` compares with a resuming run's). It is written into ``checkpoint-N.tmp``, its manifest
(size and sha256 of every file, ``checkpoint_files``) last, and renamed: a crash mid-save leaves the
previous checkpoints intact, and a damaged or missing file is found before a resume loads anything.
Every file holds plain data (tensors, numbers, strings, lists, dicts) and is loaded with
``weights_only=True``: a checkpoint cannot run code. A failed write (a full disk) stops the run with
one line saying so; the partial folder is removed, the earlier checkpoints are untouched.

Under FSDP (``sharded=True``) the weights and the optimizer state are gathered whole onto the main
process, which writes the same HF files; the optimizer state is then keyed by parameter name (not
by position), so such a checkpoint resumes only a sharded run. Loading reads on the main process and
broadcasts.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ebft.errors import CheckpointError, ConfigError, EbftError
from ebft.train import distributed
from ebft.train.checkpoint_files import (
    load_safetensors,
    load_torch,
    problem,
    save_torch,
    verify_manifest,
    write_json_atomic,
    write_manifest,
)

log = logging.getLogger("ebft")

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_MODEL_ADVICE = "resume with the base_model and adapter settings the checkpoint was trained with"


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
    """Every RNG's state as plain values (Python's and NumPy's tuples and arrays become lists and dicts)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    # legacy=True (the default) gives the MT19937 tuple; the annotation also admits the dict of legacy=False.
    assert isinstance(numpy_state, tuple)
    name, keys, pos, has_gauss, cached = numpy_state
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s values; raises KeyError, TypeError or ValueError on anything else."""
    py, nps = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"]))
    keys = np.asarray(nps["keys"], dtype=np.uint32)
    np.random.set_state((str(nps["name"]), keys, int(nps["pos"]), int(nps["has_gauss"]), float(nps["cached_gaussian"])))
    if not isinstance(state["torch"], torch.Tensor):
        raise TypeError("the torch RNG state is not a tensor")
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
    config: dict,
    extra=None,
    sharded: bool = False,
) -> None:
    """Write ``directory`` atomically. Every process writes its RNG state (and, through ``extra(tmp)``,
    whatever else its mode keeps, e.g. a rollout batch still to be reused); the main process the rest,
    ``config`` (the resolved config, JSON-ready) included, then the manifest."""
    tmp = directory.with_name(directory.name + ".tmp")
    weights = optim_state = None
    if sharded:  # collectives: every process takes part, the main process receives the whole
        weights = distributed.full_state_dict(model)
        optim_state = distributed.full_optimizer_state_dict(model, optimizer)

    def main_files() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        write_model(model, tokenizer, tmp, state_dict=weights)
        save_torch(optim_state if sharded else optimizer.state_dict(), tmp / "optimizer.pt")
        save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json_atomic(tmp / STATE_FILE, asdict(state))
        write_json_atomic(tmp / CONFIG_FILE, config)

    def process_files() -> None:
        save_torch(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
        if extra is not None:
            extra(tmp)

    def publish() -> None:
        write_manifest(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        _fsync_folder(directory.parent)

    main = accelerator.is_main_process
    _write_step(accelerator, directory, main_files if main else None)
    _write_step(accelerator, directory, process_files)
    _write_step(accelerator, directory, publish if main else None)


def _fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_step(accelerator, directory: Path, action) -> None:
    """Run ``action`` (None: nothing on this process) and agree across processes on how it went; after a
    failed write every process stops with the same line, and the partial folder is removed."""
    message = cause = None
    if action is not None:
        try:
            action()
        except (OSError, RuntimeError, SafetensorError) as exc:
            message, cause = _write_failure(directory, exc), exc
    message = distributed.first_error(accelerator, message)
    if message is not None:
        if accelerator.is_main_process:
            shutil.rmtree(directory.with_name(directory.name + ".tmp"), ignore_errors=True)
        raise EbftError(message) from cause


def _write_failure(directory: Path, exc: BaseException) -> str:
    full_disk = (errno.ENOSPC, errno.EDQUOT)
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    earlier = [p.name for p in checkpoints(directory.parent) if p != directory]
    kept = f"the earlier checkpoints ({', '.join(earlier[-3:])}) are intact" if earlier else "there is no earlier one"
    if getattr(exc, "errno", None) in full_disk or any(os.strerror(code) in reason for code in full_disk):
        return (
            f"output_dir: the disk holding {directory.parent} is full: writing {directory.name} failed "
            f"({os.strerror(errno.ENOSPC)}); the partial {directory.name}.tmp was removed and {kept}. "
            "Free some space, then resume with --resume_from_checkpoint=latest"
        )
    return f"output_dir: writing {directory.name} failed ({reason}); the partial folder was removed and {kept}"


def checkpoint_due(step: int, total_steps: int, save_steps: int | None, save_final: bool) -> bool:
    """Whether optimizer step ``step`` of ``total_steps`` ends with a ``checkpoint-N``: every ``save_steps``,
    the last step included (so a finished run can be extended), and the last step always with ``save_final``."""
    if step == total_steps and save_final:
        return True
    if not save_steps:
        return False
    return step % save_steps == 0


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


def resume_point(output_dir: Path, setting: str | None) -> Path | None:
    """The checkpoint folder named by ``resume_from_checkpoint`` (``latest``: the newest in output_dir), or
    None to start at step 0: when nothing is to be resumed, or ``latest`` finds the logs of a run stopped
    before its first checkpoint was complete (nothing to continue: it starts over). A folder that holds a
    run is not started over otherwise."""
    if setting is None:
        if found := run_in_progress(output_dir):
            raise ConfigError(
                f"output_dir: {output_dir} already holds a run ({', '.join(found[:3])}); continue it with "
                "--resume_from_checkpoint=latest, or choose another output_dir"
            )
        return None
    if setting == "latest":
        saved = checkpoints(output_dir)
        if saved:
            return saved[-1]
        if run_in_progress(output_dir):
            log.warning(
                "resume_from_checkpoint: latest, but %s holds no complete checkpoint (the run stopped before its "
                "first one was saved): starting over from step 0",
                output_dir,
            )
            return None
        raise ConfigError(f"resume_from_checkpoint: latest, but {output_dir} holds no checkpoint-N folder")
    path = Path(setting)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"resume_from_checkpoint: {setting} is not a checkpoint folder (no {STATE_FILE})")
    return path


def verify(directory: Path, accelerator) -> None:
    """The manifest check (``checkpoint_files.verify_manifest``) on the main process, its outcome shared."""
    message = None
    if accelerator.is_main_process:
        try:
            verify_manifest(directory)
        except EbftError as exc:
            message = str(exc)
    message = distributed.first_error(accelerator, message)
    if message is not None:
        raise CheckpointError(message)


def saved_config(directory: Path) -> dict:
    """The resolved config of the run that wrote checkpoint ``directory``."""
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise problem(directory, CONFIG_FILE, "missing") from None
    except (OSError, ValueError) as exc:
        raise problem(directory, CONFIG_FILE, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise problem(directory, CONFIG_FILE, "not a JSON object")
    return data


def load_checkpoint(directory: Path, *, model, optimizer, scheduler, accelerator, sharded: bool = False) -> TrainState:
    """Restore weights, optimizer, scheduler and this process's RNG states; return the saved state. Every
    file that is damaged or does not fit this run is one line naming the checkpoint and the file."""
    state = read_state(directory)
    load_weights(directory, model=model, optimizer=optimizer, accelerator=accelerator, sharded=sharded)
    if not sharded:
        optim = load_torch(directory, "optimizer.pt")
        try:
            optimizer.load_state_dict(optim)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise problem(directory, "optimizer.pt", f"does not fit this run's optimizer ({exc})") from None
    _load_scheduler(directory, scheduler)
    name = f"rng_state_{accelerator.process_index}.pt"
    try:
        set_rng_state(load_torch(directory, name))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise problem(directory, name, f"not an RNG state written by ebft ({exc})") from None
    return state


def load_weights(directory: Path, *, model, optimizer, accelerator, sharded: bool = False) -> None:
    """The model's weights (or adapter) from checkpoint ``directory``; under FSDP also the optimizer's state,
    which is read and broadcast with them (a collective: every process calls it)."""
    if sharded:
        _load_sharded(directory, model, optimizer, accelerator.is_main_process)
    else:
        _load_weights(directory, model)


_OBJECTS = {"window", "evaluation"}  # the TrainState fields that are JSON objects, not counts


def read_state(directory: Path) -> TrainState:
    """``trainer_state.json``, every key known and every count a non-negative integer."""
    try:
        data = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise problem(directory, STATE_FILE, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise problem(directory, STATE_FILE, "not a JSON object")
    known = {f.name for f in fields(TrainState)}
    if unknown := sorted(set(data) - known):
        raise problem(directory, STATE_FILE, f"unknown key {unknown[0]!r}")
    data.setdefault("evaluation", {})  # written since evaluation during training; earlier checkpoints lack it
    if missing := sorted(known - set(data)):
        raise problem(directory, STATE_FILE, f"no {missing[0]!r}")
    for key in sorted(known - _OBJECTS):
        value = data[key]
        if type(value) is not int or value < 0:
            raise problem(directory, STATE_FILE, f"{key} must be a non-negative integer, got {value!r}")
    for key in sorted(_OBJECTS):
        if not isinstance(data[key], dict):
            raise problem(directory, STATE_FILE, f"{key} must be an object, got {data[key]!r}")
    return TrainState(**data)


def _load_scheduler(directory: Path, scheduler) -> None:
    saved = load_torch(directory, "scheduler.pt")
    expected = scheduler.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(expected) or type(saved.get("last_epoch")) is not int:
        raise problem(directory, "scheduler.pt", "not the state of this run's learning-rate schedule")
    scheduler.load_state_dict(saved)
    continue_schedule(scheduler)


def _is_adapter_run(model) -> bool:
    return getattr(model, "peft_config", None) is not None


def _load_weights(directory: Path, model) -> None:
    adapter = directory / "adapter_model.safetensors"
    if _is_adapter_run(model) != adapter.exists():
        raise _kind_mismatch(directory, model)
    if adapter.exists():
        from peft import set_peft_model_state_dict

        try:
            # load_state_dict's (missing_keys, unexpected_keys); PEFT annotates it as the bare ``namedtuple``.
            missing_keys, unexpected_keys = cast(
                tuple[list[str], list[str]], set_peft_model_state_dict(model, load_safetensors(directory, adapter.name))
            )
        except RuntimeError as exc:  # a tensor of another shape: another rank, or another base model
            what = f"does not fit this run's adapter ({_first(exc)})"
            raise problem(directory, adapter.name, what, _MODEL_ADVICE) from None
        missing = [k for k in missing_keys if "lora_" in k]
        if unexpected_keys or missing:
            names = (unexpected_keys or missing)[:2]
            raise problem(directory, adapter.name, f"does not fit this run's adapter (e.g. {names})", _MODEL_ADVICE)
        return
    shards = sorted(directory.glob("model*.safetensors"))
    if not shards:
        raise problem(directory, "model.safetensors", "missing", _MODEL_ADVICE)
    weights = {}
    for shard in shards:
        weights.update(load_safetensors(directory, shard.name))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        raise problem(directory, shards[0].name, f"does not fit this model ({_first(exc)})", _MODEL_ADVICE) from None
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        names = (unexpected or missing)[:2]
        raise problem(directory, shards[0].name, f"does not fit this model (e.g. {names})", _MODEL_ADVICE)


def _kind_mismatch(directory: Path, model) -> EbftError:
    if _is_adapter_run(model):
        return problem(
            directory,
            "adapter_model.safetensors",
            "missing, but this run trains a LoRA adapter (adapter: lora)",
            _MODEL_ADVICE,
        )
    return problem(
        directory, "adapter_model.safetensors", "a LoRA adapter, but this run trains all weights", _MODEL_ADVICE
    )


def _first(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(exc).__name__)


def _load_sharded(directory: Path, model, optimizer, is_main: bool) -> None:
    """Weights and optimizer state of a sharded run: the main process reads the files, FSDP broadcasts.

    Every process checks the names first (from the file headers, cheap), so a mismatch stops all of
    them instead of leaving the others waiting in the broadcast."""
    adapter = directory / "adapter_model.safetensors"
    files = [adapter] if adapter.exists() else sorted(directory.glob("model*.safetensors"))
    rename = distributed.adapter_key_to_module_key if adapter.exists() else (lambda key: key)
    names: set[str] = set()
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                names.update(rename(key) for key in f.keys())  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError) as exc:
            raise problem(directory, path.name, f"cannot be read as safetensors ({exc})") from None
    expected = set(model.state_dict())
    missing = set() if adapter.exists() else {k for k in expected - names if not k.endswith("lm_head.weight")}
    if not files or names - expected or missing:
        shown = files[0].name if files else "model.safetensors"
        raise problem(directory, shown, "does not match this model's weights", _MODEL_ADVICE)
    weights, optim_state = {}, {}
    if is_main:
        for path in files:
            weights.update({rename(key): value for key, value in load_safetensors(directory, path.name).items()})
        optim_state = load_torch(directory, "optimizer.pt")
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
