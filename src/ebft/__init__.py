"""ebft: Energy-Based Fine-Tuning of Hugging Face causal language models (Jelassi et al., 2026).

Layout: the core at the top level (``cli``, ``trainer`` and its ``loop``/``checkpoint``/``metrics``,
``models``, ``distributed``, the pure math of ``features``, ``rewards``, ``losses`` and ``sampling``),
``config/`` and ``data/`` for the inputs, the two modes in ``strided/`` and ``structured/``,
evaluation in ``evaluate/`` and the offline demo in ``quickstart/``.
"""

__version__ = "0.1.0"
