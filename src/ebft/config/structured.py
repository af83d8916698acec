"""Cross-field checks of a structured-mode config: batch sizes against num_generations, completion lengths,
the clipping range, and the vLLM settings (no model, no server)."""

from __future__ import annotations


def structured_problems(cfg) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    trl = cfg.trl
    # An optimizer step must take whole groups of completions (TRL's rule for one process;
    # axolotl's own examples use micro_batch_size 1 with 4 accumulation steps).
    if (cfg.micro_batch_size * cfg.gradient_accumulation_steps) % trl.num_generations:
        problems.append(
            (
                "micro_batch_size",
                f"micro_batch_size * gradient_accumulation_steps = {cfg.micro_batch_size} * "
                f"{cfg.gradient_accumulation_steps} must be a multiple of trl.num_generations "
                f"= {trl.num_generations}",
            )
        )
    if trl.num_generations < 2:
        problems.append(
            (
                "trl.num_generations",
                "must be >= 2 in structured mode: group advantages compare the completions of one "
                f"prompt (got {trl.num_generations})",
            )
        )
    if trl.max_completion_length >= cfg.sequence_len:
        problems.append(
            (
                "trl.max_completion_length",
                f"must be less than sequence_len = {cfg.sequence_len} to leave room for the prompt "
                f"(got {trl.max_completion_length})",
            )
        )
    if trl.epsilon_high is not None and trl.epsilon_high < trl.epsilon:
        problems.append(("trl.epsilon_high", f"must be >= trl.epsilon = {trl.epsilon} (got {trl.epsilon_high})"))
    if trl.use_vllm and trl.vllm_lora_sync and cfg.adapter is None:
        problems.append(
            (
                "trl.vllm_lora_sync",
                "needs adapter: lora (it hot-loads a saved adapter); to fine-tune all weights set "
                "vllm_lora_sync: false and they are sent with vLLM's weight transfer (got adapter: null)",
            )
        )
    if trl.async_prefetch and not trl.use_vllm:
        problems.append(
            (
                "trl.async_prefetch",
                "needs trl.use_vllm: true; with transformers generate the rollouts run on the training "
                "device, so there is nothing to overlap with training",
            )
        )
    if cfg.vllm.max_model_len is not None and cfg.vllm.max_model_len < cfg.sequence_len:
        problems.append(
            (
                "vllm.max_model_len",
                f"must be >= sequence_len = {cfg.sequence_len}, or the server rejects the longest "
                f"prompt + completion (got {cfg.vllm.max_model_len})",
            )
        )
    return problems
