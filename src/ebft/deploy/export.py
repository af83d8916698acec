"""What a run hands over for deployment: the merged model, the run card and the Hub upload.

* :func:`merge_lora` (``ebft merge-lora RUN_DIR [--out DIR]``, and ``merge_lora: true`` at the end of
  training): the LoRA adapter folded into the *unquantised* base weights, saved as a plain transformers
  model with its tokenizer, which transformers, vLLM and ``ebft vllm-serve --base_model=DIR`` load.
* :class:`RunExport`: the trainer's hooks. At start it checks the Hub credentials (before any weights
  load); after each checkpoint it uploads what ``hub_strategy`` asks for; at the end it writes the run
  card (``README.md``), merges if asked and uploads the final model or adapter.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ebft.config import TrainConfig, load_config
from ebft.deploy.card import FinalModel, write_card
from ebft.deploy.hub import prepare_upload
from ebft.errors import ConfigError
from ebft.modeling.adapters import load_adapter, read_adapter_config
from ebft.modeling.parts import embedding_rows
from ebft.modeling.precision import configured_dtype
from ebft.modeling.source import local_model

log = logging.getLogger("ebft")

MERGED_DIR = "merged"


def merge_lora(run_dir: str | Path, out: str | Path | None = None, *, base_model: str | None = None, cfg=None) -> Path:
    """Merge the adapter in ``run_dir`` into its base model; write a plain model + tokenizer to ``out``.

    The base comes from ``base_model``, else the run's ``config.yaml`` (in ``run_dir`` or, for a
    ``checkpoint-N`` folder, its parent), else the adapter's own ``base_model_name_or_path``. It is
    loaded in fp32 without quantisation, so a QLoRA adapter merges into the full-precision weights, and
    saved in the run's ``torch_dtype`` when it sets one, else in the dtype the base was stored in. Returns
    the output folder (default ``run_dir/merged``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"merge-lora: no such folder {str(run)!r}")
    lora = read_adapter_config(str(run), "merge-lora")
    cfg = cfg if cfg is not None else _run_config(run)
    base = base_model or (cfg.base_model if cfg is not None else None) or lora.base_model_name_or_path
    if not base:
        raise ConfigError(f"merge-lora: {run} names no base model (no config.yaml); pass --base-model")
    base = local_model(base)
    trust = bool(cfg.trust_remote_code) if cfg is not None else False
    target = Path(out) if out is not None else run / MERGED_DIR
    tokenizer = AutoTokenizer.from_pretrained(
        run if (run / "tokenizer_config.json").is_file() else base, trust_remote_code=trust
    )
    try:
        stored = (configured_dtype(cfg) if cfg is not None else None) or _stored_dtype(
            AutoConfig.from_pretrained(base, trust_remote_code=trust)
        )
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"merge-lora: cannot load the base model {base!r}: {exc}") from exc
    # Training grows the embeddings to a tokenizer with added tokens; the adapter was trained on that shape.
    if len(tokenizer) > embedding_rows(model):
        model.resize_token_embeddings(len(tokenizer))
    merged = load_adapter(model, str(run), lora, "merge-lora", trainable=False).merge_and_unload()
    if stored != torch.float32:
        merged = merged.to(stored)
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if cfg is not None:
        write_card(target, cfg, kind="merged", metrics=last_logged(run if (run / "metrics.jsonl").exists() else None))
    log.info("merge-lora: wrote %s, the adapter in %s merged into a copy of %s (which is unchanged)", target, run, base)
    return target


def _stored_dtype(config) -> torch.dtype:
    """The floating dtype the base's weights were saved in (config.json's dtype); fp32 when it names none."""
    value = getattr(config, "dtype", None)
    value = getattr(torch, value, None) if isinstance(value, str) else value
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def _run_config(run: Path):

    for folder in (run, run.parent):
        if (folder / "config.yaml").is_file():
            return load_config(folder / "config.yaml")
    return None


def last_logged(run: Path | None) -> dict[str, float]:
    """The last line of ``run/metrics.jsonl`` (step included), or {} without one."""
    path = None if run is None else run / "metrics.jsonl"
    if path is None or not path.is_file():
        return {}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


class RunExport:
    """The trainer's deployment hooks; see the module docstring. Only the main process writes or uploads."""

    def __init__(self, cfg: TrainConfig, accelerator):

        self.cfg = cfg
        self.is_main = accelerator.is_main_process
        self.hub = prepare_upload(cfg, accelerator)  # raises before training on missing or bad credentials

    def checkpoint_saved(self, path: Path) -> None:
        if self.hub is not None and self.is_main:
            self.hub.checkpoint(path)

    def finish(self, out_dir: Path, steps: int, metrics: dict[str, float], final: FinalModel | None = None) -> None:
        if not self.is_main:
            return

        kind = "adapter" if self.cfg.adapter is not None else "full"
        write_card(out_dir, self.cfg, kind=kind, metrics={"step": steps, **metrics}, final=final)
        if self.cfg.merge_lora:
            merge_lora(out_dir, out_dir / MERGED_DIR, cfg=self.cfg)
        if self.hub is not None:
            self.hub.final(out_dir)
