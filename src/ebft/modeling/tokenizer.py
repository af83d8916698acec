"""The tokenizer of a config (from the base model or ``tokenizer_config``), given a pad token and the
config's chat template, and the token ids the config names checked against it."""

from __future__ import annotations

import logging
from pathlib import Path

from ebft.config import TrainConfig
from ebft.errors import ConfigError
from ebft.modeling.chat_templates import choose
from ebft.modeling.source import local_model, require_local_folder

log = logging.getLogger("ebft")


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    source = local_model(cfg.tokenizer_config or cfg.base_model, key)
    require_local_folder(key, source)
    log.info("loading the tokenizer of %s", source)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        local = Path(source).expanduser()
        if local.is_dir() and not any(local.glob("tokenizer*")):
            raise ConfigError(
                f"{key}: the folder {source!r} holds no tokenizer (no tokenizer.json or tokenizer_config.json); "
                "save the tokenizer there or set tokenizer_config to a folder or hub id that has one"
            ) from exc
        raise ConfigError(f"{key}: cannot load a tokenizer from {source!r}: {exc}") from exc
    if cfg.special_tokens:
        tok.add_special_tokens(dict(cfg.special_tokens))
    apply_chat_template(tok, cfg)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(
                f"the tokenizer of {source!r} has neither a pad token nor an eos token; "
                "set special_tokens: {pad_token: ...}"
            )
        # Padding is never attended to by real tokens, never anchored and never labelled, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; padding with the eos token %r", tok.eos_token)
    check_token_ids(cfg, len(tok))
    return tok


def check_token_ids(cfg: TrainConfig, vocab_size: int) -> None:
    """Every token id the config names must exist in the tokenizer: an id outside it could never be
    sampled (a stop id that never stops), so it is an error naming the key, the id and the size."""
    if cfg.ebft.mode != "structured":
        return  # the trl block is not used in strided mode (the config warns about it)
    key = "trl.generation_kwargs.stop_token_ids"
    for token_id in cfg.trl.generation_kwargs.stop_token_ids or ():
        if token_id >= vocab_size:
            raise ConfigError(
                f"{key}: {token_id} is not a token id of this tokenizer (a vocabulary of {vocab_size} tokens, "
                f"ids 0..{vocab_size - 1}); use the ids of this model's own stop tokens, e.g. "
                "tokenizer.convert_tokens_to_ids('<|im_end|>'), or drop the key"
            )


def apply_chat_template(tok, cfg: TrainConfig) -> None:
    """Set ``cfg.chat_template`` (``ebft.modeling.chat_templates``) on ``tok`` before any data is rendered
    with it; saving the tokenizer then saves the template. Warns when the format's end-of-turn token is not
    one token of this tokenizer: the model could then never end a turn with a single stop token."""
    if cfg.chat_template is None and cfg.chat_template_jinja is None:
        return
    try:
        chosen = choose(cfg.chat_template, cfg.chat_template_jinja, getattr(tok, "chat_template", None))
    except (ValueError, OSError) as exc:
        key = "chat_template_jinja" if cfg.chat_template in (None, "jinja") else "chat_template"
        raise ConfigError(f"{key}: {exc}") from exc
    if chosen.text is None:
        log.info("chat_template: %s: using the tokenizer's own template", cfg.chat_template)
        return
    replaced = "replacing the tokenizer's own" if getattr(tok, "chat_template", None) else "the tokenizer had none"
    tok.chat_template = chosen.text
    log.info("chat_template: rendering chats with %s (%s)", chosen.name, replaced)
    if chosen.turn_end is None:
        return
    if len(tok.tokenize(chosen.turn_end)) != 1:
        log.warning(
            "chat_template: %s ends each turn with %r, which this tokenizer splits into several tokens, so a "
            "sampled turn cannot end on one stop token; add it to the vocabulary as the eos, e.g. "
            "special_tokens: {eos_token: %r}",
            chosen.name,
            chosen.turn_end,
            chosen.turn_end,
        )
        return
    turn_end = tok.convert_tokens_to_ids(chosen.turn_end)
    stops = cfg.trl.generation_kwargs.stop_token_ids or ()
    if cfg.ebft.mode == "structured" and turn_end != tok.eos_token_id and turn_end not in stops:
        log.warning(
            "chat_template: %s ends each turn with %r (id %d), which is not the tokenizer's eos %r, so a completion "
            "does not stop there; add %d to trl.generation_kwargs.stop_token_ids",
            chosen.name,
            chosen.turn_end,
            turn_end,
            tok.eos_token,
            turn_end,
        )
