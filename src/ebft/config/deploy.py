"""Config checks for warm starts, quantised bases, merging and Hub upload (no model, no network).

Called from the config's cross-field validator and from its value warnings; each returns
``(key path, reason)`` pairs or warning lines in the config module's format.
"""

from __future__ import annotations

import re

# A Hub repo id: an optional namespace and a name, each of letters, digits, '-', '_' and '.'.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def uploads(cfg) -> bool:
    """Whether the run uploads to the Hub: a hub_model_id, unless push_to_hub is false."""
    return cfg.hub_model_id is not None and cfg.push_to_hub is not False


def deploy_problems(cfg) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    quantised = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit" if cfg.load_in_8bit else None
    if cfg.load_in_4bit and cfg.load_in_8bit:
        problems.append(("load_in_8bit", "set load_in_4bit or load_in_8bit, not both"))
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        problems.append(
            ("adapter", "qlora is LoRA over a 4-bit base: set load_in_4bit: true, or use adapter: lora (got qlora)")
        )
    if quantised and cfg.adapter is None:
        problems.append((quantised, "quantised weights cannot be trained; set adapter: qlora (4-bit) or adapter: lora"))
    if quantised and cfg.fsdp_version == 2:
        problems.append(
            (quantised, "cannot be combined with fsdp_version: 2 (FSDP does not shard bitsandbytes weights)")
        )
    if quantised and cfg.ebft.mode == "structured" and cfg.trl.use_vllm:
        problems.append(
            (
                quantised,
                "cannot be combined with trl.use_vllm: the vLLM server would sample from the unquantised base while "
                "the policy is scored on the quantised one; use the transformers generate backend",
            )
        )
    if cfg.lora_model_dir is not None and cfg.adapter is None:
        problems.append(("lora_model_dir", "a LoRA adapter is trained further only with adapter: lora (or qlora)"))
    if cfg.merge_lora and cfg.adapter is None:
        problems.append(("merge_lora", "there is no adapter to merge without adapter: lora (or qlora)"))
    if cfg.push_to_hub and cfg.hub_model_id is None:
        problems.append(("push_to_hub", "set hub_model_id to the repo to upload to"))
    if cfg.hub_model_id is not None and not _REPO_ID.match(cfg.hub_model_id):
        problems.append(
            ("hub_model_id", f"must be 'name' or 'namespace/name' (letters, digits, - _ .), got {cfg.hub_model_id!r}")
        )
    return problems


def deploy_warnings(cfg) -> list[str]:
    out: list[str] = []
    if cfg.ebft.feature_network == "warm_start" and cfg.lora_model_dir is None:
        out.append("ebft.feature_network: warm_start is the base model itself without lora_model_dir")
    if not uploads(cfg):
        fields = type(cfg).model_fields
        out += [
            f"{key}: has no effect without hub_model_id (and push_to_hub not false)"
            for key in ("hub_strategy", "hub_private_repo", "hub_revision")
            if getattr(cfg, key) != fields[key].default
        ]
    return out
