"""The training config: schema, YAML loading, CLI overrides and every check that needs no model.

The YAML format is axolotl's (flat training keys, ``rl: ebft``, an ``ebft:`` block, ``datasets:``),
so an axolotl EBFT config loads unchanged. Loading goes

    YAML file -> mapping -> ``--key.path=value`` overrides -> axolotl-compatibility pass -> pydantic

and every problem found on the way is reported together in one :class:`~ebft.errors.ConfigError`
whose message starts with the config file's path, one ``key.path: reason (got value)`` line per
problem. Key paths are dotted, list items by index (``datasets.0.path``), which is also the
override syntax.

Modules, in reading order: ``sections`` (the schema of each block), ``train`` (:class:`TrainConfig`
and its cross-field checks), ``compat`` (the axolotl key tables and the pass that applies them),
``value_warnings``, ``load`` (YAML, overrides, error messages); ``base`` holds what they share;
``deploy`` checks the keys of warm starts, quantised bases, merging and Hub uploads.

Public API
----------
* :func:`load_config` ``(path, overrides=()) -> TrainConfig`` and :func:`parse_config` (same,
  from an already-parsed mapping).
* :func:`config_warnings` ``(cfg) -> list[str]``: **how warnings are exposed.** It returns the
  warnings found while loading (each accepted-but-unused axolotl key, a renamed key) followed by
  the ones that follow from the values (for example ``n_samples_per_prompt: 1`` falling back to
  reinforce). Nothing is printed or logged here; the CLI prints the list. The load-time part is
  kept in a private attribute of the returned config, so a config built in code
  (``TrainConfig(...)``) has only the value-derived warnings.
* :func:`config_notes` ``(cfg) -> list[str]``: lines a run logs once at its start so that its metrics
  read right (for example that whitening makes the diversity term 0); not warnings.
* :func:`dump_config` ``(cfg) -> str``: the resolved config as YAML; loading it again gives an
  equal config. Accepted-but-unused axolotl keys are not written (they change nothing).
* :data:`IGNORED_AXOLOTL_KEYS` (accepted, one warning each, no effect) and
  :data:`UNSUPPORTED_AXOLOTL_KEYS` (accepted only when off / empty; otherwise an error);
  :data:`UNSUPPORTED_TRL_KEYS` is the same for keys inside ``trl:`` (0 also counts as off);
  :data:`IGNORED_TRL_KEYS`, :data:`LIMITED_TRL_KEYS` (only some values) and :data:`IGNORED_VLLM_KEYS`
  cover the rest of axolotl's ``trl:`` and ``vllm:`` schema;
  :data:`FSDP_IGNORED_KEYS` and :data:`FSDP_LIMITED_KEYS` for keys inside ``fsdp_config:``.
* The schema: :class:`TrainConfig` and its sections :class:`EbftSection`, :class:`DatasetSpec`,
  :class:`TrlSection` (with :class:`GenerationKwargs`), :class:`FsdpSection` and :class:`VllmSection`.
  ``cfg.trl`` and ``cfg.vllm`` are always section objects; ``trl: null`` in a file means all defaults.
* :func:`vllm_client_address` ``(cfg) -> (host, port)`` that training connects to, and
  :func:`vllm_serve_address` ``(cfg) -> (host, port)`` that ``ebft vllm-serve`` binds to.

Building :class:`TrainConfig` directly (``TrainConfig.model_validate(d)``) runs the same schema and
cross-field checks but raises pydantic's ValidationError and knows nothing of axolotl-only keys;
the loaders above are the user-facing path. ``==`` on configs compares settings only.
"""

from ebft.config.compat import (
    FSDP_IGNORED_KEYS,
    FSDP_LIMITED_KEYS,
    IGNORED_AXOLOTL_KEYS,
    IGNORED_TRL_KEYS,
    IGNORED_VLLM_KEYS,
    LIMITED_TRL_KEYS,
    UNSUPPORTED_AXOLOTL_KEYS,
    UNSUPPORTED_TRL_KEYS,
)
from ebft.config.load import dump_config, load_config, parse_config
from ebft.config.sections import DatasetSpec, EbftSection, FsdpSection, GenerationKwargs, TrlSection, VllmSection
from ebft.config.train import TrainConfig, vllm_client_address, vllm_serve_address
from ebft.config.value_warnings import config_notes, config_warnings

__all__ = [
    "IGNORED_AXOLOTL_KEYS",
    "UNSUPPORTED_AXOLOTL_KEYS",
    "UNSUPPORTED_TRL_KEYS",
    "IGNORED_TRL_KEYS",
    "LIMITED_TRL_KEYS",
    "IGNORED_VLLM_KEYS",
    "FSDP_IGNORED_KEYS",
    "FSDP_LIMITED_KEYS",
    "FsdpSection",
    "DatasetSpec",
    "EbftSection",
    "GenerationKwargs",
    "TrainConfig",
    "TrlSection",
    "VllmSection",
    "config_notes",
    "config_warnings",
    "dump_config",
    "load_config",
    "parse_config",
    "vllm_client_address",
    "vllm_serve_address",
]
