"""Evaluation: metric arithmetic against hand values and oracles, and ``ebft evaluate`` end to end."""

from __future__ import annotations

import itertools
import json
import logging
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import stdlib_texts

from ebft.evaluate import metrics as em
from ebft.rewards import reward_terms

# ---------------------------------------------------------------- CFM estimate


def _terms(gen, gt):
    return reward_terms(gen, gt, alignment_coef=1.0, diversity_coef=1.0, use_whitening=False)


def test_cfm_unbiased_hand_values():
    y = torch.tensor([[1.0, 0.0]])
    # phi_1 = y, phi_2 orthogonal: a = (2 cos 0, 2 cos 90deg) = (2, 0); d_i = 2/(2-1) <phi_1, phi_2> = 0.
    # 1 - mean(a - d/2) = 1 - (2 + 0)/2 = 0. Directly: the off-diagonal <phi_1, phi_2> = 0 stands for
    # ||E phi||^2, -2 mean <phi_i, y> = -1, + ||y||^2 = 1 -> 0.
    # The plug-in ||(1/2, 1/2) - (1, 0)||^2 = 1/4 + 1/4 = 1/2 would be biased up by the i = j terms.
    terms = _terms(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), y)
    assert torch.allclose(terms.alignment, torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(em.cfm_unbiased(terms.alignment, terms.diversity), torch.tensor([0.0]), atol=1e-6)
    assert torch.allclose(terms.cfm, torch.tensor([0.5]))

    # Both samples equal to -y: a = -2, d = 2 * <-y, -y> = 2 -> 1 - (-2 - 1) = 4 = ||-y - y||^2.
    terms = _terms(torch.tensor([[[-1.0, 0.0], [-1.0, 0.0]]]), y)
    assert torch.allclose(em.cfm_unbiased(terms.alignment, terms.diversity), torch.tensor([4.0]))


def test_cfm_unbiased_is_unbiased_by_enumeration():
    """E over all n-tuples of draws from a 3-point distribution equals the true ||E phi - y||^2."""
    torch.manual_seed(0)
    points = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=-1)
    probs = [0.5, 0.3, 0.2]
    y = torch.nn.functional.normalize(torch.randn(5, dtype=torch.float64), dim=-1)
    truth = float(((torch.tensor(probs, dtype=torch.float64)[:, None] * points).sum(0) - y).square().sum())
    n = 3
    expected_u = expected_plugin = 0.0
    for draw in itertools.product(range(3), repeat=n):
        weight = math.prod(probs[k] for k in draw)
        terms = _terms(points[list(draw)][None].float(), y[None].float())
        expected_u += weight * float(em.cfm_unbiased(terms.alignment, terms.diversity))
        expected_plugin += weight * float(terms.cfm)
    assert expected_u == pytest.approx(truth, abs=1e-5)
    # The plug-in estimate is biased upward; the oracle can tell the two apart.
    assert expected_plugin - truth > 0.05


def test_cfm_unbiased_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        em.cfm_unbiased(torch.ones(3, 1), torch.zeros(3, 1))


def test_best_of_n():
    assert torch.equal(em.best_of_n(torch.tensor([[0.1, 0.7, -0.2], [1.0, 0.0, 0.5]])), torch.tensor([0.7, 1.0]))


# ---------------------------------------------------------------- token masks and totals


def test_next_token_masks():
    # doc 0: 5 real tokens, no prompt, all labelled -> targets 1..4 all count.
    # doc 1: 4 real tokens + 1 pad, prompt of 2 tokens (labels -100 on it): targets 1..4 are tokens
    #        1, 2, 3 (real) and 4 (padding); answer targets are 2 and 3.
    # doc 2: 5 real tokens, prompt_length 3, but every label set (a transform that labels its prompt):
    #        the answer still starts at token 3.
    labels = torch.tensor(
        [
            [5, 6, 7, 8, 9],
            [-100, -100, 7, 8, -100],
            [1, 2, 3, 4, 5],
        ]
    )
    lengths = torch.tensor([5, 4, 5])
    prompt = torch.tensor([-1, 2, 3])
    all_, answer = em.next_token_masks(lengths, labels, prompt)
    assert all_.tolist() == [[True] * 4, [True, True, True, False], [True] * 4]
    assert answer.tolist() == [[True] * 4, [False, True, True, False], [False, False, True, True]]


def test_summarise_hand_values():
    sums = dict.fromkeys(em.SUM_KEYS, 0.0)
    # 2 blocks x 4 samples: alignment sum 4 -> mean 0.5; diversity 2 -> 0.25; reward 4 - 2 = 2 -> 0.25.
    # best-of-n sums over the 2 blocks: 3 and 1 -> 1.5 and 0.5; CFM 0.2 + 0.4 over 2 blocks -> 0.3.
    # CE: 6 nats over 3 tokens -> 2, perplexity e^2; no answer tokens -> None.
    sums.update(
        samples=8,
        blocks=2,
        cfm_blocks=2,
        alignment=4,
        diversity=2,
        reward=2,
        best_alignment=3,
        best_reward=1,
        cfm=0.6,
        ce_sum=6,
        tokens=3,
    )
    out = em.summarise(sums)
    assert out["alignment"] == 0.5 and out["diversity"] == 0.25 and out["reward"] == 0.25
    assert out["alignment_best_of_n"] == 1.5 and out["reward_best_of_n"] == 0.5
    assert out["cfm_loss"] == pytest.approx(0.3)
    assert out["ce_loss"] == 2.0 and out["perplexity"] == pytest.approx(7.389056)
    assert out["answer_ce_loss"] is None and out["answer_perplexity"] is None


def test_perplexity_overflow_is_inf():
    assert em.perplexity(1000.0) == math.inf
    assert em.perplexity(None) is None


# ---------------------------------------------------------------- pass@k


def test_pass_at_k_hand_values():
    assert em.pass_at_k(5, 1, 1) == pytest.approx(0.2)  # one correct in five, one draw
    assert em.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert em.pass_at_k(4, 0, 2) == 0.0
    assert em.pass_at_k(4, 4, 1) == 1.0
    assert em.pass_at_k(4, 3, 2) == 1.0  # only one wrong sample: every pair holds a correct one


def test_pass_at_k_matches_enumeration():
    """The fraction of all k-subsets of the n samples that contain a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert em.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(200, 50) ~ 4.5e47 overflows nothing here, but a float ratio of binomials would lose precision.
    exact = 1 - Fraction(math.comb(100, 50), math.comb(200, 50))
    assert em.pass_at_k(200, 100, 50) == pytest.approx(float(exact), abs=1e-12)
    assert em.pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_mean_pass_at_k_and_errors():
    assert em.mean_pass_at_k([(5, 1), (5, 2)], 1) == pytest.approx((0.2 + 0.4) / 2)
    with pytest.raises(ValueError):
        em.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        em.pass_at_k(3, 1, 4)


# ---------------------------------------------------------------- paired comparison


def test_compare_paired():
    # Every document improves by exactly 1: stderr 0, b wins when higher is better, a when lower is.
    assert em.compare_paired([1, 2, 3], [2, 3, 4], higher_is_better=True).winner == "b"
    assert em.compare_paired([1, 2, 3], [2, 3, 4], higher_is_better=False).winner == "a"
    # diffs (1, -1, 1, -1.2): mean -0.05; squared deviations 1.1025 + 0.9025 + 1.1025 + 1.3225 = 4.43,
    # var 4.43 / 3, stderr sqrt(4.43 / 12) = 0.6076 -> |mean| < 2 stderr: a tie.
    result = em.compare_paired([0, 0, 0, 0], [1, -1, 1, -1.2], higher_is_better=True)
    assert result.winner == "tie"
    assert result.diff == pytest.approx(-0.05) and result.stderr == pytest.approx(0.6076, abs=1e-4)
    assert em.compare_paired([1.0], [2.0], higher_is_better=True).winner == "tie"  # one document: unknown noise


# ---------------------------------------------------------------- ebft evaluate


def test_spread_indices():
    from ebft.train.batches import spread_indices

    assert spread_indices(10, 4) == [0, 2, 5, 7]
    assert spread_indices(3, None) == [0, 1, 2]
    assert spread_indices(3, 5) == [0, 1, 2]


def _write_config(tmp_path: Path, model_dir: Path, **ebft) -> Path:
    import yaml

    data = tmp_path / "docs.jsonl"
    if not data.exists():
        with open(data, "w") as handle:
            for text in stdlib_texts(6):
                handle.write(json.dumps({"text": text[:3000]}) + "\n")
    cfg = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {
            "mode": "strided",
            "stride": 8,
            "context_length": 8,
            "generate_max_len": 4,
            "n_samples_per_prompt": 3,
            "temperature": 1.0,
            "use_whitening": False,
            **ebft,
        },
        "datasets": [{"path": str(data), "type": "ebft_pretrain.transform"}],
        "sequence_len": 48,
        "micro_batch_size": 2,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _evaluate(config: Path, tmp_path: Path, *extra: str) -> dict:
    from ebft.cli import main

    output = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*.json')))}.json"
    assert main(["evaluate", str(config), "--split", "train", "--max-docs", "3", "--output", str(output), *extra]) == 0
    return json.loads(output.read_text())


def _oracle_ce(model, config: Path, indices: list[int]) -> float:
    """Token-weighted CE of the evaluated documents, one plain HF forward per document."""
    from ebft.config import load_config
    from ebft.data.load import load_strided_datasets
    from ebft.modeling.tokenizer import load_tokenizer

    cfg = load_config(config)
    rows = load_strided_datasets(cfg, load_tokenizer(cfg)).train
    nll = count = 0.0
    with torch.no_grad():
        for i in indices:
            ids = torch.tensor(rows[i]["input_ids"])[None]
            loss = model(input_ids=ids, labels=ids).loss  # mean over len - 1 targets
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return nll / count


@pytest.fixture(scope="module")
def base_eval(tiny_model_dir, tmp_path_factory):
    # main() configures the ebft logger before any test's own restore fixture saved it: undo that here,
    # or later modules' caplog would see nothing.
    logger = logging.getLogger("ebft")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    tmp = tmp_path_factory.mktemp("eval-base")
    config = _write_config(tmp, tiny_model_dir)
    yield tmp, config, _evaluate(config, tmp)
    logger.handlers[:], logger.propagate, logger.level = saved


def test_evaluate_cli_end_to_end(base_eval, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    _tmp, config, report = base_eval
    m = report["metrics"]
    assert report["model"]["kind"] == "base"
    assert report["data"]["documents"] == 3 and len(report["documents"]) == 3
    assert report["data"]["blocks"] > 0
    # Without whitening, alignment and diversity are on unit features, so CFM = 1 - (a - d/2) exactly.
    assert m["cfm_loss"] == pytest.approx(1 - (m["alignment"] - m["diversity"] / 2), abs=1e-5)
    assert m["reward_best_of_n"] >= m["reward"] and m["alignment_best_of_n"] >= m["alignment"]
    # Raw text: every token is an answer token.
    assert m["answer_ce_loss"] == pytest.approx(m["ce_loss"])
    assert m["perplexity"] == pytest.approx(math.exp(m["ce_loss"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    indices = [d["index"] for d in report["documents"]]
    assert m["ce_loss"] == pytest.approx(_oracle_ce(model, config, indices), rel=1e-4)


def test_cfm_ignores_training_whitening(base_eval, tiny_model_dir):
    """With whitening the reward terms change, but the CFM estimate stays on unwhitened features."""
    tmp, _config, plain = base_eval
    whitened = _evaluate(_write_config(tmp, tiny_model_dir, use_whitening=True), tmp)
    assert whitened["metrics"]["cfm_loss"] == pytest.approx(plain["metrics"]["cfm_loss"], abs=1e-6)
    assert whitened["metrics"]["alignment"] != pytest.approx(plain["metrics"]["alignment"], abs=1e-3)


def test_evaluate_lora_checkpoint(base_eval, tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _tmp, config, base_report = base_eval
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 5.0)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)

    report = _evaluate(config, tmp_path, "--checkpoint", str(adapter))
    assert report["model"]["kind"] == "lora"
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).merge_and_unload()
    indices = [d["index"] for d in report["documents"]]
    assert report["metrics"]["ce_loss"] == pytest.approx(_oracle_ce(merged, config, indices), rel=1e-4)
    assert report["metrics"]["ce_loss"] != pytest.approx(base_report["metrics"]["ce_loss"], rel=1e-3)


def test_full_checkpoint_policy_and_base_features(tiny_model_dir, tmp_path):
    """A full checkpoint is the policy; the feature network keeps the base model's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ebft.config import load_config
    from ebft.evaluate.load import load_models

    changed = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        changed.model.layers[0].self_attn.q_proj.weight.mul_(3.0)
    full = tmp_path / "full"
    changed.save_pretrained(full)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(full)

    config = _write_config(tmp_path, tiny_model_dir)
    _tok, policy, feature_source, kind = load_models(load_config(config), full, torch.device("cpu"))
    assert kind == "full"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q_base = base.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(policy.model.layers[0].self_attn.q_proj.weight, 3 * q_base)
    assert torch.equal(feature_source.model.layers[0].self_attn.q_proj.weight, q_base)

    report = _evaluate(config, tmp_path, "--checkpoint", str(full))
    indices = [d["index"] for d in report["documents"]]
    assert report["model"]["kind"] == "full"
    assert report["metrics"]["ce_loss"] == pytest.approx(_oracle_ce(changed, config, indices), rel=1e-4)


def test_evaluate_errors(base_eval, tmp_path, capsys):
    from ebft.cli import main

    _tmp, config, _report = base_eval
    assert main(["evaluate", str(config), "--split", "train", "--execute"]) == 2
    assert "--execute" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(config), "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "neither a model folder" in capsys.readouterr().err
