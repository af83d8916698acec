"""``ebft evaluate`` in structured mode: the report's shape and identities, CE, alignment, reward and CFM
against independent recomputations, determinism, splits, and the CLI's table and JSON.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from evaluate_builders import CAP, G, evaluation_data, run_evaluate, write_config

from ebft.evaluate.output import METRICS


@pytest.fixture(scope="module")
def base_eval(tiny_model_dir, tmp_path_factory):
    # main() configures the ebft logger before any test's own restore fixture saved it: undo that here,
    # or later modules' caplog would see nothing.
    logger = logging.getLogger("ebft")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    tmp = tmp_path_factory.mktemp("eval-structured")
    config = write_config(tmp, tiny_model_dir)
    yield tmp, config, run_evaluate(config, tmp, "--split", "train")
    logger.handlers[:], logger.propagate, logger.level = saved


def _hf_model(model_dir):
    """The plain HF model, on the device evaluation uses (so that regenerated samples draw the same numbers)."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval().to(device)


# ---------------------------------------------------------------- metrics


def test_structured_report_shape_and_internal_identities(base_eval):
    _tmp, _config, report = base_eval
    m = report["metrics"]
    keys = {key for key, _label, _better in METRICS} | {"completion_length", "truncated_fraction"}
    assert set(m) == keys  # no pass@ keys without --execute
    assert all(math.isfinite(v) for v in m.values())
    assert report["data"] == {
        "source": "rows of the datasets at split 'train'",
        "prompts": 6,
        "completions": 6 * G,
        "tokens": report["data"]["tokens"],
        "answer_tokens": report["data"]["answer_tokens"],
    }
    assert report["settings"]["rollout_backend"] == "transformers generate"
    assert "execution" not in report and "per completion" in report["notes"][0]
    docs = report["documents"]
    assert [d["index"] for d in docs] == list(range(6))
    for d in docs:
        # Unit features without whitening: CFM = 1 - mean(a - d/2), per prompt and overall.
        assert d["cfm_loss"] == pytest.approx(1 - (d["alignment"] - d["diversity"] / 2), abs=1e-5)
        assert d["alignment_best_of_n"] >= d["alignment"] - 1e-6 and d["reward_best_of_n"] >= d["reward"] - 1e-6
        assert 1 <= d["completion_length"] <= CAP and 0 <= d["truncated_fraction"] <= 1
        assert d["perplexity"] == pytest.approx(math.exp(d["ce_loss"]))
    # Overall values are means over all completions (3 per prompt), best-of-n and CFM over prompts.
    assert m["alignment"] == pytest.approx(sum(d["alignment"] for d in docs) / 6)
    assert m["cfm_loss"] == pytest.approx(sum(d["cfm_loss"] for d in docs) / 6)


def test_ce_matches_a_hand_teacher_forced_computation(base_eval, tiny_model_dir, tiny_tokenizer):
    """CE over prompt + ground truth + EOS, and over ground truth + EOS, with plain HF forwards."""
    _tmp, config, report = base_eval
    model = _hf_model(tiny_model_dir)
    rows = evaluation_data(config).train
    nll = count = answer_nll = answer_count = 0.0
    with torch.no_grad():
        for d in report["documents"]:
            row = rows[d["index"]]
            ids = torch.tensor([*row.prompt_ids, *row.gt_ids, tiny_tokenizer.eos_token_id], device=model.device)[None]
            labels = ids.clone()
            labels[0, : len(row.prompt_ids)] = -100
            targets = ids.shape[1] - 1
            answers = len(row.gt_ids) + 1
            row_nll = float(model(input_ids=ids, labels=ids).loss) * targets
            row_answer = float(model(input_ids=ids, labels=labels).loss) * answers
            # The tiny model is near uniform (CE ~ ln 384), so different token sets differ by only ~1e-4
            # relative: compare tightly (float32 forwards, batched or not, agree to ~1e-6).
            assert d["ce_loss"] == pytest.approx(row_nll / targets, rel=2e-5)
            assert d["answer_ce_loss"] == pytest.approx(row_answer / answers, rel=2e-5)
            nll, count = nll + row_nll, count + targets
            answer_nll, answer_count = answer_nll + row_answer, answer_count + answers
    assert report["data"]["tokens"] == count and report["data"]["answer_tokens"] == answer_count
    assert report["metrics"]["ce_loss"] == pytest.approx(nll / count, rel=2e-5)
    assert report["metrics"]["answer_ce_loss"] == pytest.approx(answer_nll / answer_count, rel=2e-5)


def _oracle_features(model, ids: list[int]) -> torch.Tensor:
    """Default feature settings by hand: hidden states 1, 2, 3 of the 4-layer model (fractions 0.25, 0.5,
    0.75), each L2-normalised at the last token, concatenated."""
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True).hidden_states
    return torch.cat([torch.nn.functional.normalize(hidden[i][0, -1], dim=-1) for i in (1, 2, 3)]).cpu()


def test_alignment_reward_and_cfm_match_an_independent_recomputation(base_eval, tiny_model_dir, tiny_tokenizer):
    """Regenerate one prompt's completions with the evaluation's seed, embed them with plain HF forwards,
    and recompute alignment, diversity, reward, best-of-n and the unbiased CFM from their definitions."""
    from ebft.config import load_config
    from ebft.structured.hf import HFGenerate
    from ebft.structured.rollout import Sampling, mix_seed

    _tmp, config, report = base_eval
    cfg = load_config(config)
    model = _hf_model(tiny_model_dir)
    rows = evaluation_data(config).train
    eos = tiny_tokenizer.eos_token_id
    sampler = HFGenerate(model, sampling=Sampling.from_trl(cfg.trl, eos), pad_token_id=tiny_tokenizer.pad_token_id)
    for d in report["documents"][:2]:
        row = rows[d["index"]]
        (completions,) = sampler.generate([list(row.prompt_ids)], G, [CAP], [mix_seed(cfg.seed, -1, d["index"])])
        phi = torch.stack(
            [_oracle_features(model, [*row.prompt_ids, *(c.ids[:-1] if c.finished else c.ids)]) for c in completions]
        )
        y = _oracle_features(model, [*row.prompt_ids, *row.gt_ids])
        u, v = torch.nn.functional.normalize(phi, dim=-1), torch.nn.functional.normalize(y, dim=-1)
        align = 2 * (u @ v)  # [G]
        gram = u @ u.T
        off = gram.sum(1) - gram.diagonal()
        divers = 2 / (G - 1) * off
        reward = align - divers
        # ||E phi - y||^2 with E||phi||^2 replaced by the mean over ordered pairs i != j.
        cfm = float(off.sum() / (G * (G - 1)) - 2 * (u @ v).mean() + 1)
        assert d["alignment"] == pytest.approx(float(align.mean()), abs=1e-4)
        assert d["diversity"] == pytest.approx(float(divers.mean()), abs=1e-4)
        assert d["reward"] == pytest.approx(float(reward.mean()), abs=1e-4)
        assert d["alignment_best_of_n"] == pytest.approx(float(align.max()), abs=1e-4)
        assert d["reward_best_of_n"] == pytest.approx(float(reward.max()), abs=1e-4)
        assert d["cfm_loss"] == pytest.approx(cfm, abs=1e-4)
        lengths = [len(c.ids) for c in completions]
        assert d["completion_length"] == pytest.approx(sum(lengths) / G)
        assert d["truncated_fraction"] == pytest.approx(sum(not c.finished for c in completions) / G)


def test_two_evaluations_are_identical_and_a_subset_keeps_each_rows_numbers(base_eval, tiny_model_dir, tmp_path):
    _tmp, config, first = base_eval
    again = run_evaluate(config, tmp_path, "--split", "train")
    assert again["metrics"] == first["metrics"]
    assert again["documents"] == first["documents"]
    # --max-docs spreads over the set; rows are seeded by their held-out index, so their rollouts do not
    # change. Scores agree up to batching noise (rows are scored two at a time, with other partners here).
    subset = run_evaluate(config, tmp_path, "--split", "train", "--max-docs", "3")
    assert [d["index"] for d in subset["documents"]] == [0, 2, 4]
    for d in subset["documents"]:
        full = first["documents"][d["index"]]
        assert d["completion_length"] == full["completion_length"]
        assert d["reward"] == pytest.approx(full["reward"], abs=1e-4)


def test_whitening_changes_the_reward_terms_but_not_the_cfm(base_eval, tiny_model_dir, tmp_path):
    _tmp, _config, plain = base_eval
    whitened = run_evaluate(write_config(tmp_path, tiny_model_dir, ebft={"use_whitening": True}), tmp_path)
    assert whitened["metrics"]["cfm_loss"] == pytest.approx(plain["metrics"]["cfm_loss"], abs=1e-5)
    assert whitened["metrics"]["alignment"] != pytest.approx(plain["metrics"]["alignment"], abs=1e-3)


# ---------------------------------------------------------------- row selection


def _gt_lengths(rows) -> list[int]:
    return [len(r.gt_ids) for r in rows]


def test_split_selects_that_split_of_every_dataset(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir)
    every = evaluation_data(config).train
    assert len(set(_gt_lengths(every))) == len(every)  # rows are told apart by ground-truth length
    report = run_evaluate(config, tmp_path, "--split", "train[3:]")
    assert report["data"]["source"] == "rows of the datasets at split 'train[3:]'"
    assert [d["ground_truth_tokens"] for d in report["documents"]] == _gt_lengths(every[3:])


def test_val_set_size_evaluates_the_rows_training_held_out(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, val_set_size=2)
    data = evaluation_data(config)
    report = run_evaluate(config, tmp_path)
    assert report["data"]["source"] == "validation rows (val_set_size=2, seed 3)"
    assert [d["ground_truth_tokens"] for d in report["documents"]] == _gt_lengths(data.val)
    assert len(data.val) == 2 and set(_gt_lengths(data.train)).isdisjoint(_gt_lengths(data.val))


def test_without_split_or_validation_rows_it_says_so_and_samples_the_training_rows(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from ebft.evaluate import run

    monkeypatch.setattr(run, "_said", set())  # each line is said once per process; this test reads them
    config = write_config(tmp_path, tiny_model_dir)
    report = run_evaluate(config, tmp_path, "--max-docs", "2")
    # The CLI logs through rich, which wraps long lines.
    err = " ".join(capsys.readouterr().err.split())
    # The first line says which rows, before any loading.
    assert err.startswith("INFO evaluating on a sample of the training rows (at most 2 documents, spread evenly; ")
    assert "evaluating 2 of the 6 training rows (split train)" in err
    assert report["data"]["source"] == "training rows (split train)"
    assert [d["index"] for d in report["documents"]] == [0, 3]


def test_vllm_config_is_evaluated_with_transformers_generate(tiny_model_dir, tmp_path):
    config = write_config(
        tmp_path,
        tiny_model_dir,
        trl={"use_vllm": True, "vllm_lora_sync": True},
        adapter="lora",
        lora_target_linear=True,
    )
    report = run_evaluate(config, tmp_path, "--split", "train", "--max-docs", "1")
    assert report["settings"]["rollout_backend"] == "transformers generate"
    assert any("transformers generate" in note for note in report["notes"])


# ---------------------------------------------------------------- CLI


def test_cli_prints_the_table_and_writes_json(tiny_model_dir, tmp_path, capsys):
    from ebft.cli import main

    config = write_config(tmp_path, tiny_model_dir)
    output = tmp_path / "report.json"
    assert main(["evaluate", str(config), "--split", "train", "--max-docs", "2", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "ebft evaluate" in out and "2 prompts, 6 completions" in out
    assert "completion length" in out and "pass@1" not in out
    report = json.loads(output.read_text())
    assert len(report["documents"]) == 2 and report["data"]["prompts"] == 2
