"""A config's memory plan on this machine, or on hardware named on the command line (``ebft validate
--gpus 2 --device-memory 80GiB``): ``ebft.modeling.memory_plan``'s arithmetic applied to the model's shape
(built on the meta device, no weights) and to what the config makes each phase read."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ebft.config import TrainConfig
from ebft.errors import EbftError
from ebft.features import layer_indices
from ebft.modeling.adapters import saved_adapter_config, warm_start_critic
from ebft.modeling.feature_network import feature_placement, visible_cuda_devices
from ebft.modeling.memory_plan import (
    DevicePlan,
    ModelShape,
    Precision,
    Training,
    Workload,
    count,
    gib,
    plan_devices,
    render,
)
from ebft.modeling.model_shape import model_shape, plan_model_config
from ebft.modeling.precision import describe, dtype_name, run_dtypes

log = logging.getLogger("ebft")

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'80GB' (10^9 bytes each), '80GiB' (2^30), '81920MiB', ... -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise EbftError(f"--device-memory: cannot read {text!r}; write a size such as 80GiB or 24GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class Hardware:
    """What the plan is for: visible GPUs, processes, and the memory of each device where it is known."""

    gpus: int
    processes: int
    capacities: dict[str, int | None]
    present: bool  # the GPUs are this machine's (their bf16 support can be asked)

    @classmethod
    def here(cls, processes: int = 1) -> Hardware:
        """This machine's GPUs and memory; the processes of a run share its host memory, so each one's plan
        gets its share of it."""
        gpus = visible_cuda_devices()
        host = _host_memory()
        capacities: dict[str, int | None] = {"cpu": None if host is None else host // processes}
        for i in range(gpus):
            capacities[f"cuda:{i}"] = cuda_memory(i)
        return cls(gpus, processes, capacities, present=True)

    @classmethod
    def named(cls, *, gpus: int | None, processes: int | None, device_memory: int | None) -> Hardware:
        """This machine with what the command line overrides: a GPU count (GPUs that are not here) and one
        memory size for every GPU (for the CPU when there are none)."""
        here = cls.here(processes or 1)
        if gpus is None and device_memory is None:
            return here
        count = here.gpus if gpus is None else gpus
        foreign = gpus is not None and gpus != here.gpus
        capacities: dict[str, int | None] = {"cpu": None if foreign else here.capacities["cpu"]}
        for i in range(count):
            capacities[f"cuda:{i}"] = device_memory if device_memory is not None else here.capacities.get(f"cuda:{i}")
        if count == 0 and device_memory is not None:
            capacities["cpu"] = device_memory
        return cls(count, processes or 1, capacities, present=not foreign)


def cuda_memory(index: int) -> int:
    """Bytes of memory of visible GPU ``index``."""
    return torch.cuda.get_device_properties(index).total_memory


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class MemoryPlan:
    header: list[str]
    devices: list[DevicePlan]

    def lines(self) -> list[str]:
        return [*self.header, *render(self.devices)]


def _bf16_on(cfg, hardware: Hardware) -> bool:
    """``bf16`` for the plan's training device: ``auto`` is bf16 on a GPU that supports it (a GPU that is not
    here is taken to)."""
    if cfg.bf16 != "auto":
        return bool(cfg.bf16)
    if hardware.gpus == 0:
        return False
    return torch.cuda.is_bf16_supported() if hardware.present and torch.cuda.is_available() else True


def lora_config_for_plan(cfg: TrainConfig):
    """The LoraConfig whose parameters the plan counts (the saved adapter's, for a warm start)."""
    if cfg.adapter is None:
        return None
    from peft import LoraConfig

    if cfg.lora_model_dir is not None:
        return saved_adapter_config(cfg)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules="all-linear" if cfg.lora_target_linear else cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )


WorkloadOf = Callable[..., Workload]  # (cfg, shape) -> the token counts of a mode's phases: Mode.workload


def build_plan(
    cfg: TrainConfig, hardware: Hardware, workload: WorkloadOf, shape: ModelShape | None = None
) -> MemoryPlan:
    """The plan of process 0 (every process holds the same on its own GPU). ``workload``: the mode's phases
    (``Mode.workload``); ``shape``: the model's, when the caller has it (the guide's table); else built from the
    config of ``cfg.base_model``."""
    if shape is None:
        config, reason = plan_model_config(cfg)
        if config is None:
            raise EbftError(f"memory plan: {reason}")
        # Building a model, even on the meta device, draws from torch's generator (weight init, LoRA's
        # kaiming init): the plan must leave the seeded state exactly as it found it.
        with torch.random.fork_rng(devices=[]):
            shape = model_shape(config, lora=lora_config_for_plan(cfg), trust_remote_code=cfg.trust_remote_code)
    bf16 = _bf16_on(cfg, hardware)
    weights, compute, features = (dtype_name(d) for d in run_dtypes(cfg, bf16))
    bits = 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None
    precision = Precision(weights, compute, features, quantised_bits=bits)
    policy_device = torch.device("cuda", 0) if hardware.gpus else torch.device("cpu")
    feature_device = feature_placement(
        cfg.ebft.feature_device, policy_device, processes=hardware.processes, gpus=hardware.gpus
    )
    depths = layer_indices(cfg.ebft.feature_layers, shape.layers)
    shared = cfg.adapter is not None and not warm_start_critic(cfg) and feature_device == policy_device
    training = Training(
        lora=cfg.adapter is not None,
        optimizer={"adamw_torch": "adamw", "adamw_torch_fused": "adamw_fused"}.get(cfg.optimizer, cfg.optimizer),
        checkpointing=cfg.gradient_checkpointing,
        shards=hardware.processes if (cfg.fsdp_version == 2 and hardware.processes > 1) else 1,
        feature_copy=not shared,
        feature_depth=max(depths),
        feature_layers=len(set(depths)),
    )
    devices = plan_devices(
        shape,
        precision,
        training,
        workload(cfg, shape),
        policy_device=str(policy_device),
        feature_device=str(feature_device),
        capacities=hardware.capacities,
    )
    each = f"; each of the {hardware.processes} processes holds the same" if hardware.processes > 1 else ""
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    header = [
        f"memory plan (an estimate from the model config, no weights loaded{each}): {cfg.base_model}, "
        f"{count(shape.total_params)} params, {cfg.ebft.mode} mode, sequence_len {cfg.sequence_len}, "
        f"micro_batch_size {cfg.micro_batch_size}, gradient_checkpointing {checkpointing}",
        describe(cfg, bf16),
    ]
    return MemoryPlan(header, devices)


def log_plan(
    cfg: TrainConfig, hardware: Hardware, workload: WorkloadOf, *, shape: ModelShape | None = None
) -> MemoryPlan | None:
    """Log the plan, with a warning for every device it does not fit; an unreadable model config is noted."""
    try:
        plan = build_plan(cfg, hardware, workload, shape)
    except EbftError as exc:
        log.info("%s", exc)
        log.info("%s", describe(cfg, _bf16_on(cfg, hardware)))
        return None
    # The plan is advice: whatever keeps it from being made (a model class that cannot be built on the meta
    # device, a PEFT that cannot inject there) must not stop the run, whose own checks come next.
    except Exception as exc:  # noqa: BLE001
        log.warning("memory plan: not made (%s: %s)", type(exc).__name__, exc)
        log.info("%s", describe(cfg, _bf16_on(cfg, hardware)))
        return None
    for line in plan.lines():
        log.info("%s", line)
    for device in plan.devices:
        if device.capacity is not None and device.headroom is not None and device.headroom < 0:
            log.warning(
                "memory plan: %s needs about %s of its %s (%s more); %s",
                device.device,
                gib(device.total),
                gib(device.capacity),
                gib(-device.headroom),
                advice(cfg, device),
            )
    return plan


def advice(cfg: TrainConfig, device: DevicePlan) -> str:
    """What to change, for the largest terms of a device that does not fit."""
    ideas = []
    names = {t.label: t.bytes for t in device.terms}
    if cfg.adapter is None and names.get("optimizer state", 0) > 0:
        if cfg.torch_dtype is None:
            ideas.append("torch_dtype: bfloat16 (bf16 weights, gradients and AdamW moments)")
        ideas.append("adapter: lora")
    if names.get("frozen feature network", 0) > 0:
        ideas.append("ebft.feature_device: cpu (or a second GPU)")
    if not cfg.gradient_checkpointing:
        ideas.append("gradient_checkpointing: true")
    ideas.append("a shorter sequence_len or a smaller micro_batch_size")
    return "try " + "; ".join(ideas)
