"""Rollouts on the training device for every causal LM (docs/design.md §7.2): the shared-prefill decoder carries
hybrid and recurrent caches (convolution and recurrent states repeated per sample and dropped with finished rows), and
whatever it cannot reproduce (a cache of another kind, a repetition penalty, a logit-changing generation
setting) is sampled by transformers ``generate``, chosen once and logged: never a crash, never a silently
different distribution.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hybrid_models import ATTENTION, FAMILIES, SPECIAL, VOCAB, build_family, perturb_norms

from ebft.structured import decode
from ebft.structured.hf import HFGenerate
from ebft.structured.rollout import Sampling

PROMPTS = [[1, 5, 9, 14, 3, 22, 40], [1, 30, 17], [1, 8, 8, 8, 12], [1]]
SEEDS = [11, 12, 13, 14]


def _greedy_by_full_forwards(model, prompt: list[int], cap: int, stops: tuple[int, ...]) -> tuple[int, ...]:
    """Argmax decoding that recomputes the whole sequence at every step: no cache, no padding."""
    seq = list(prompt)
    with torch.no_grad():
        while len(seq) - len(prompt) < cap:
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            if seq[-1] in stops:
                break
    return tuple(seq[len(prompt) :])


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_rollouts_are_greedy_decoding_by_full_forwards(name):
    model = build_family(name)
    stops = (2, 7)
    caps = [8, 5, 8, 6]
    want = [_greedy_by_full_forwards(model, p, c, stops) for p, c in zip(PROMPTS, caps, strict=True)]
    sampling = Sampling(0.0, stop_token_ids=stops)
    for shared_prefill in (True, False):
        backend = HFGenerate(model, sampling=sampling, pad_token_id=0, shared_prefill=shared_prefill)
        assert backend.shared_prefill == shared_prefill  # every family here: the decoder when allowed
        got = backend.generate(PROMPTS, 2, caps, SEEDS)
        assert [[c.ids for c in group] for group in got] == [[w, w] for w in want], shared_prefill


@pytest.mark.parametrize("name", ["qwen3_5_text", "falcon_h1", "mamba", "lfm2"])
def test_one_prefill_per_prompt_and_finished_rows_leave_with_their_state(name):
    """The decoder's forwards: one prefill of the 4 prompts (not 4 x 3 copies), then one-token steps over a
    batch that only shrinks; each step's rows are exactly the samples still running. The draws are
    generate's, so the conv and recurrent states went with their rows."""
    model = build_family(name)
    sampling = Sampling(1.0, stop_token_ids=(2, 7, 11, 13))
    forwards: list[tuple[int, int]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: forwards.append(tuple(a[0].shape)))
    got = HFGenerate(model, sampling=sampling, pad_token_id=0).generate(PROMPTS, 3, [10] * 4, SEEDS)
    hook.remove()
    assert forwards[0] == (4, max(len(p) for p in PROMPTS))
    steps = [rows for rows, tokens in forwards[1:]]
    assert all(tokens == 1 for _, tokens in forwards[1:])
    assert steps == sorted(steps, reverse=True) and steps[0] <= 12 and steps[-1] < steps[0]
    # Row-steps after the first token: the tokens generated after each completion's first.
    assert sum(steps) == sum(len(c.ids) - 1 for group in got for c in group)
    want = HFGenerate(model, sampling=sampling, pad_token_id=0, shared_prefill=False).generate(
        PROMPTS, 3, [10] * 4, SEEDS
    )
    assert got == want


def _minimax():
    """Tiny MiniMax: lightning (linear) attention layers keep their state in MiniMaxCache, not a DynamicCache."""
    import transformers

    config = transformers.MiniMaxConfig(
        vocab_size=VOCAB,
        **SPECIAL,
        **ATTENTION,
        intermediate_size=48,
        num_hidden_layers=2,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        block_size=4,
        layer_types=["linear_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return perturb_norms(model).eval()


def test_a_cache_of_another_kind_rolls_out_through_generate(caplog):
    """MiniMax crashed the decoder (a ValueError on its first forward); it is sampled by generate instead,
    the reason logged once, and greedy rollouts are greedy decoding by full forwards."""
    model = _minimax()
    with caplog.at_level(logging.INFO, logger="ebft"):
        backend = HFGenerate(model, sampling=Sampling(0.0, stop_token_ids=(2,)), pad_token_id=0)
        got = backend.generate(PROMPTS, 2, [6] * 4, SEEDS)
        backend.generate(PROMPTS[:1], 2, [6], SEEDS[:1])
    assert not backend.shared_prefill
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rollouts:")]
    assert lines == [
        "rollouts: transformers generate, because of MiniMaxForCausalLM keeps its cache in a structure of its own"
    ]
    want = [_greedy_by_full_forwards(model, p, 6, (2,)) for p in PROMPTS]
    assert [[c.ids for c in group] for group in got] == [[w, w] for w in want]


def test_cache_layers_the_decoder_does_not_know_route_to_generate():
    """A cache layer type whose per-row state the decoder is not known to select (DeepSeek-V3.2's indexer
    keys) sends the model to generate rather than risk a row of another sample's state."""
    from types import SimpleNamespace

    import transformers

    model = SimpleNamespace(config=transformers.DeepseekV32Config(num_hidden_layers=2))
    assert decode.cache_reason(model) == "its cache has layers of type ['DynamicIndexedLayer']"
    assert decode.generate_reason(model, Sampling()) == decode.cache_reason(model)


# generation settings the decoder does not apply: (Sampling keyword arguments, generation_config settings, logged)
NOT_REPRODUCED = {
    "repetition_penalty": ({"repetition_penalty": 1.3}, {}, "trl.repetition_penalty 1.3"),
    "no_repeat_ngram_size": ({}, {"no_repeat_ngram_size": 2}, "generation_config sets no_repeat_ngram_size"),
    "suppress_tokens": ({}, {"suppress_tokens": [5, 9]}, "generation_config sets suppress_tokens"),
    "bad_words_ids": ({}, {"bad_words_ids": [[9]]}, "generation_config sets bad_words_ids"),
    "min_length": ({}, {"min_length": 9}, "generation_config sets min_length"),
    "sequence_bias": ({}, {"sequence_bias": {(9,): 4.0}}, "generation_config sets sequence_bias"),
    "guidance_scale": ({}, {"guidance_scale": 1.5}, "generation_config sets guidance_scale"),
}


@pytest.mark.parametrize("setting", list(NOT_REPRODUCED))
def test_settings_the_decoder_does_not_apply_never_reach_it(setting, monkeypatch, caplog):
    """Fails if the shared-prefill decoder ever samples under such a setting: it would silently drop it."""
    sampling_kwargs, generation, logged = NOT_REPRODUCED[setting]
    model = build_family("qwen3_5_text")
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    sampling = Sampling(1.0, stop_token_ids=(2,), **sampling_kwargs)
    want = HFGenerate(model, sampling=sampling, pad_token_id=0, shared_prefill=False).generate(
        PROMPTS, 2, [6] * 4, SEEDS
    )

    def fast_decoder(*args, **kwargs):
        raise AssertionError(f"the shared-prefill decoder sampled under {setting}")

    monkeypatch.setattr(decode, "shared_prefill_generate", fast_decoder)
    with caplog.at_level(logging.INFO, logger="ebft"):
        backend = HFGenerate(model, sampling=sampling, pad_token_id=0)
    assert not backend.shared_prefill
    assert logged in caplog.text and "the shared-prefill decoder does not apply it" in caplog.text
    assert backend.generate(PROMPTS, 2, [6] * 4, SEEDS) == want


def test_every_logit_changing_generation_setting_is_named():
    """Each generation_config setting the decoder does not apply is found on its own, by name."""
    model = build_family("mamba2")
    assert decode.generate_reason(model, Sampling()) is None
    for key in decode._LOGIT_SETTINGS + decode._FACTOR_SETTINGS:
        previous = getattr(model.generation_config, key, None)
        setattr(model.generation_config, key, 2)
        assert decode.generate_reason(model, Sampling()) == (
            f"the model's generation_config sets {key} (the shared-prefill decoder does not apply it)"
        )
        setattr(model.generation_config, key, previous)


def test_generate_never_beam_searches():
    """A model whose generation_config asks for beam search still gets sampled, draw for draw as the decoder."""
    model = build_family("qwen3_5_text")
    sampling = Sampling(1.0, stop_token_ids=(2, 7))
    want = HFGenerate(model, sampling=sampling, pad_token_id=0).generate(PROMPTS, 2, [6] * 4, SEEDS)
    model.generation_config.num_beams = 3
    got = HFGenerate(model, sampling=sampling, pad_token_id=0, shared_prefill=False).generate(
        PROMPTS, 2, [6] * 4, SEEDS
    )
    assert got == want


def test_trl_repetition_penalty_wins_over_the_models_generation_config():
    """A checkpoint's generation_config repetition_penalty (Qwen2.5 ships 1.05) is replaced by trl's on every path:
    generate is handed trl's value, so the decoder, which applies none, still draws what generate draws."""
    model = build_family("qwen3_5_text")
    model.generation_config.repetition_penalty = 1.3
    sampling = Sampling(1.0, stop_token_ids=(2, 7))
    backend = HFGenerate(model, sampling=sampling, pad_token_id=0)
    assert backend.shared_prefill
    generate = HFGenerate(model, sampling=sampling, pad_token_id=0, shared_prefill=False)
    assert backend.generate(PROMPTS, 2, [8] * 4, SEEDS) == generate.generate(PROMPTS, 2, [8] * 4, SEEDS)
