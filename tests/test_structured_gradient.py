"""The structured step's gradient against plain teacher-forced forwards (docs/design.md §6): REINFORCE on
policy, skipped micro-batches, stored old log-probs, and the CE term on the ground truth.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from structured_builders import (
    MAX_COMPLETION,
    assistant_message,
    encode,
    flat_grad,
    load_model,
    make_row,
    run_step,
    structured_settings,
    teacher_forced_logp,
    user_message,
)
from transformers import AutoModelForCausalLM

from ebft import losses
from ebft.structured.rollout import Completion, Sampling
from ebft.structured.scoring import Scores
from ebft.structured.stats import StructuredStats
from ebft.structured.step import RolloutBuffer, _single_turn, ce_sequences, microbatch, old_logprobs, policy_logprobs


def _training_batch(tok, s):
    """Two prompts x two completions of different lengths (one without EOS), and their advantages."""
    rows = [
        make_row(tok, [user_message("def square(x):")], "    return x * x"),
        make_row(tok, [user_message("Sort a list of numbers in place, then print it.")], "xs.sort()\nprint(xs)"),
    ]
    texts = [["    return x ** 2", "    x"], ["xs = sorted(xs)", "print(sorted(xs))\n# done"]]
    eos = tok.eos_token_id
    comps = [
        Completion(tuple(encode(tok, t) + ([eos] if k != 1 else [])), finished=k != 1)
        for k, t in enumerate(sum(texts, []))
    ]
    samples = [_single_turn(rows[i // 2], c, s, tok) for i, c in enumerate(comps)]
    advantage = torch.tensor([0.7, -1.3, 0.4, 0.9])
    zeros = torch.zeros(2, 2)
    buffer = RolloutBuffer(
        rows, samples, Scores(zeros, zeros, zeros, advantage.reshape(2, 2), zeros[:, 0]), advantage, 0
    )
    return buffer


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_gradient_is_reinforce(tiny_model_dir, tiny_tokenizer, loss_type, temperature):
    tok = tiny_tokenizer
    s = structured_settings(
        tok, num_generations=2, loss_type=loss_type, sampling=Sampling(temperature, stop_token_ids=(tok.eos_token_id,))
    )
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    splits = [[0, 1], [2, 3]]
    sums = run_step(model, buffer, s, tok, splits)
    got = flat_grad(params)

    # Independent: -(sum_i A_i sum_t logp_it) / norm, each completion forwarded on its own. The loss
    # value itself is the same expression with every logp replaced by the ratio, 1.
    N = len(buffer.samples)
    tokens = sum(sum(q.loss_mask[1:]) for q in buffer.samples)
    total, value = 0.0, 0.0
    for split in splits:
        split_tokens = sum(sum(buffer.samples[i].loss_mask[1:]) for i in split)
        for i in split:
            q, a = buffer.samples[i], float(buffer.advantage[i])
            logp = teacher_forced_logp(model, q.sequence, temperature)[torch.tensor(q.loss_mask[1:])]
            for x, ratio in ((logp, False), (torch.ones_like(logp), True)):
                if loss_type == "dapo":  # token mean over the step
                    term = -a * x.sum() / tokens
                elif loss_type == "grpo":  # mean over completions of each completion's token mean
                    term = -a * x.mean() / N
                elif loss_type == "dr_grpo":  # token sum / (completions x max_completion_length)
                    term = -a * x.sum() / (N * MAX_COMPLETION)
                else:  # bnpo: mean over micro-batches of each micro-batch's token mean
                    term = -a * x.sum() / split_tokens / len(splits)
                if ratio:
                    value += float(term)
                else:
                    total = total + term
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # On-policy nothing is clipped; the summed micro-batch losses are the step loss (rl_coef 1: the RL loss).
    assert sum(p.clip_low + p.clip_high for p in sums) == 0
    assert sum(p.loss for p in sums) == pytest.approx(value, rel=1e-5)
    assert sum(p.rl_loss for p in sums) == pytest.approx(value, rel=1e-5)
    # Per micro-batch: its loss tokens, and the entropy of the sampler's distribution summed over them.
    for split, part in zip(splits, sums, strict=True):
        assert part.rl_tokens == sum(sum(buffer.samples[i].loss_mask[1:]) for i in split)
        entropy = 0.0
        for i in split:
            q = buffer.samples[i]
            with torch.no_grad():
                logits = model(torch.tensor([q.sequence])).logits[0, :-1].float() / temperature
            logp_all = logits.log_softmax(-1)[torch.tensor(q.loss_mask[1:])]
            entropy += float(-(logp_all.exp() * logp_all).sum())
        assert part.entropy == pytest.approx(entropy, rel=1e-4)


def test_zero_advantage_micro_batches_are_skipped_when_asked(tiny_model_dir, tiny_tokenizer):
    """skip_zero_advantage_batches: a micro-batch whose advantages are all 0 runs no policy pass, adds no
    gradient and says so; the others train as usual (dapo: divided by the step's token count)."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=2, loss_type="dapo", skip_zero_advantage_batches=True)
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    # The first micro-batch has nothing to learn; the second has one zero and one non-zero advantage.
    buffer.advantage = torch.tensor([0.0, 0.0, 0.0, 0.9])

    assert run_step(model, buffer, s, tok, [[0, 1]]) == [StructuredStats(skipped_micro_batches=1.0)]
    assert all(p.grad is None for p in params)  # no pass at all, not even one with weight 0

    sums = run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    assert sums[0] == StructuredStats(skipped_micro_batches=1.0) and sums[1].skipped_micro_batches == 0
    got = flat_grad(params)
    tokens = sum(sum(q.loss_mask[1:]) for q in buffer.samples)
    total = 0.0
    for i in (2, 3):
        q = buffer.samples[i]
        logp = teacher_forced_logp(model, q.sequence)[torch.tensor(q.loss_mask[1:])]
        total = total - float(buffer.advantage[i]) * logp.sum() / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)

    # Without the flag the zero-advantage micro-batch runs (its tokens count) and adds a zero gradient.
    sums = run_step(model, buffer, replace(s, skip_zero_advantage_batches=False), tok, [[0, 1], [2, 3]])
    assert sums[0].skipped_micro_batches == 0 and sums[0].rl_tokens > 0
    torch.testing.assert_close(flat_grad(params), want, atol=1e-6, rtol=1e-4)


def test_stored_old_logprobs_give_the_same_first_iteration_gradient(tiny_model_dir, tiny_tokenizer):
    """num_iterations > 1: the first step trains against log-probs stored when the batch was made;
    with unchanged weights the ratio is 1 and the gradient is the on-policy one."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=2, loss_type="dapo", num_iterations=2)
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    on_policy = flat_grad(params)
    buffer.old_logprobs = old_logprobs(model, buffer.samples, s, tok.pad_token_id, 2, None)
    # One stored tensor per completion, one value per loss token after the first position.
    assert [len(v) for v in buffer.old_logprobs] == [sum(q.loss_mask[1:]) for q in buffer.samples]
    run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    torch.testing.assert_close(flat_grad(params), on_policy, atol=1e-7, rtol=1e-5)

    # Stale log-probs (higher than now by log 2 on every token: ratio 0.5 < 1 - 0.2): completions with
    # A > 0 keep their gradient scaled by r = 0.5, completions with A < 0 are clipped (no gradient).
    buffer.old_logprobs = [v + math.log(2.0) for v in buffer.old_logprobs]
    sums = run_step(model, buffer, s, tok, [[0, 1], [2, 3]])
    got = flat_grad(params)
    tokens = sum(sum(q.loss_mask[1:]) for q in buffer.samples)
    total = 0.0
    for q, a in zip(buffer.samples, buffer.advantage.tolist(), strict=True):
        if a > 0:
            logp = teacher_forced_logp(model, q.sequence)[torch.tensor(q.loss_mask[1:])]
            total = total - 0.5 * a * logp.sum() / tokens
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    negative = [i for i, a in enumerate(buffer.advantage.tolist()) if a < 0]
    assert sum(p.clip_low for p in sums) == sum(sum(buffer.samples[i].loss_mask[1:]) for i in negative)


def test_ce_runs_under_the_training_autocast_and_divides_by_the_steps_targets(tiny_model_dir, tiny_tokenizer):
    """The CE pass runs under the step's autocast (bf16 here), and its NLL is divided by the step's CE target
    count as given, however small (1 here: the loss is then the raw sum)."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=2, loss_type="dapo", rl_coef=0.0, ce_coef=0.5)
    model = load_model(tiny_model_dir)
    buffer = _training_batch(tok, s)
    norm = losses.LossNorm(sequences=4, tokens=1, max_completion_length=MAX_COMPLETION, micro_batches=1)
    bf16 = microbatch(
        model, buffer, [0, 1, 2, 3], [0, 1], s, norm, 1, tok, pad_id=tok.pad_token_id, autocast_dtype=torch.bfloat16
    )
    refs = ce_sequences(buffer.rows, tok, s)
    with torch.no_grad():
        nll_bf16 = -float(policy_logprobs(model, refs, s, tok.pad_token_id, autocast_dtype=torch.bfloat16)[0].sum())
        nll_fp32 = -float(policy_logprobs(model, refs, s, tok.pad_token_id)[0].sum())
    assert bf16.ce_sum == pytest.approx(nll_bf16, rel=1e-5)
    assert abs(nll_bf16 - nll_fp32) > 1e-3  # bf16 shows in the sum
    assert bf16.loss == pytest.approx(0.5 * bf16.ce_sum, rel=1e-6)  # divided by 1


def test_rl_and_ce_in_one_microbatch_add_up(tiny_model_dir, tiny_tokenizer):
    """Loss = rl_coef x surrogate + ce_coef x CE: with both on, one micro-batch's loss and gradient are the sums
    of the RL-only and CE-only runs on the same batch (each term's own value is checked elsewhere)."""
    tok = tiny_tokenizer
    model = load_model(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for name, rl, ce in (("both", 0.8, 0.5), ("rl", 0.8, 0.0), ("ce", 0.0, 0.5)):
        s = structured_settings(tok, num_generations=2, loss_type="dapo", rl_coef=rl, ce_coef=ce)
        buffer = _training_batch(tok, s)
        sums = run_step(model, buffer, s, tok, [[0, 1, 2, 3]], ce_tokens=7)
        runs[name] = (sums[0].loss, flat_grad(params))
    assert runs["rl"][0] != 0 and runs["ce"][0] != 0  # both terms are present in the sum below
    assert runs["both"][0] == pytest.approx(runs["rl"][0] + runs["ce"][0], rel=1e-5)
    torch.testing.assert_close(runs["both"][1], runs["rl"][1] + runs["ce"][1], atol=1e-6, rtol=1e-4)


def test_models_that_run_padded_get_the_same_ce_and_stored_logprobs(tiny_model_dir, tiny_tokenizer):
    """Eager attention cannot run packed, so the policy pass pads with the pad id: the CE and the stored
    log-probs are still each sequence's plain teacher-forced values."""
    from ebft.structured.forward import use_packed

    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=2, loss_type="dapo", rl_coef=0.0, ce_coef=0.5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").float()
    assert not use_packed(model)
    buffer = _training_batch(tok, s)
    sums = run_step(model, buffer, s, tok, [[0, 1], [2, 3]], ce_tokens=1)
    nll = 0.0
    with torch.no_grad():
        for r in buffer.rows:
            seq = list(r.prompt_ids) + encode(tok, r.ground_truth) + [tok.eos_token_id]
            nll -= float(teacher_forced_logp(model, seq)[len(r.prompt_ids) - 1 :].sum())
        stored = old_logprobs(model, buffer.samples, s, tok.pad_token_id, 4, None)
        for q, got in zip(buffer.samples, stored, strict=True):
            want = teacher_forced_logp(model, q.sequence)[torch.tensor(q.loss_mask[1:])]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert sum(p.ce_sum for p in sums) == pytest.approx(nll, rel=1e-5)


def test_old_logprobs_are_taken_under_the_training_autocast(tiny_model_dir, tiny_tokenizer):
    """The log-probs stored for num_iterations > 1 are the training pass's own, under the same bf16 autocast and
    the same chunks, so the first iteration's ratio is exactly 1."""
    tok = tiny_tokenizer
    s = structured_settings(tok, num_generations=2)
    model = load_model(tiny_model_dir, lm_head_scale=4.0)
    samples = _training_batch(tok, s).samples
    stored = old_logprobs(model, samples, s, tok.pad_token_id, 2, torch.bfloat16)
    assert [len(v) for v in stored] == [sum(q.loss_mask[1:]) for q in samples]
    with torch.no_grad():
        for start in (0, 2):
            logp, seq = policy_logprobs(
                model, samples[start : start + 2], s, tok.pad_token_id, autocast_dtype=torch.bfloat16
            )
            for i in range(2):
                assert torch.equal(stored[start + i], logp[seq == i])
    plain = old_logprobs(model, samples, s, tok.pad_token_id, 2, None)
    assert max(float((a - b).abs().max()) for a, b in zip(stored, plain, strict=True)) > 1e-3  # bf16 shows


def test_ce_term_is_teacher_forced_nll_of_ground_truth_and_eos(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    # The sampler's temperature and truncation (each of which changes log-probs here: top-5 of 384 tokens, min_p
    # 0.9 of the top probability) shape the policy loss only; CE is the model's own untempered NLL.
    sampling = Sampling(0.7, top_p=0.6, top_k=5, min_p=0.9, stop_token_ids=(tok.eos_token_id,))
    s = structured_settings(tok, num_generations=2, loss_type="dapo", rl_coef=0.0, ce_coef=0.5, sampling=sampling)
    model = load_model(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = _training_batch(tok, s)
    gts = [list(r.prompt_ids) + encode(tok, r.ground_truth) + [tok.eos_token_id] for r in buffer.rows]
    ce_tokens = sum(len(encode(tok, r.ground_truth)) + 1 for r in buffer.rows)  # ground truth + EOS
    sums = run_step(model, buffer, s, tok, [[0, 1], [2, 3]], ce_tokens=ce_tokens)
    got = flat_grad(params)
    nll = 0.0
    for r, seq in zip(buffer.rows, gts, strict=True):
        nll = nll - teacher_forced_logp(model, seq)[len(r.prompt_ids) - 1 :].sum()
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(0.5 * nll / ce_tokens, params)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert sum(p.ce_sum for p in sums) == pytest.approx(float(nll.detach()), rel=1e-5)


def _labelled_runs(seq: list[int], mask: list[bool]) -> list[list[int]]:
    """The maximal runs of consecutive loss tokens of a sequence."""
    runs: list[list[int]] = []
    previous = False
    for t, m in zip(seq, mask, strict=True):
        if m and not previous:
            runs.append([])
        if m:
            runs[-1].append(t)
        previous = m
    return runs


def test_ce_sequences_of_a_multi_turn_row_label_every_assistant_turn(tiny_tokenizer):
    """The CE reference of a multi-turn row is the whole ground-truth conversation as the chat template renders
    it (with the configured chat_template_kwargs), with loss tokens on exactly the assistant contents and the
    stop token that ends each of them (the end of every turn is trained)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% if house_style is defined %}[{{ house_style }}]{% endif %}" + tiny_tokenizer.chat_template
    s = structured_settings(tok, chat_template_kwargs={"house_style": "terse"})
    prompt = [user_message("first question")]
    later = [user_message("second question"), assistant_message("second answer")]
    row = make_row(tok, prompt, "first answer", later)
    (ref,) = ce_sequences([row], tok, s)
    conversation = [*prompt, assistant_message("first answer"), *later]
    rendered = tok.apply_chat_template(conversation, tokenize=False, house_style="terse")
    assert rendered.startswith("[terse]<|user|>")  # the kwarg reaches the template
    assert ref.sequence == encode(tok, rendered)
    # The prompt is the rendered first user turn with its generation prompt, exactly as the policy sees it.
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, house_style="terse")
    prompt_ids = encode(tok, prompt_text)
    assert ref.prompt_length == len(prompt_ids) and ref.sequence[: ref.prompt_length] == prompt_ids
    assert not any(ref.loss_mask[: ref.prompt_length])
    assert [tok.decode(r) for r in _labelled_runs(ref.sequence, ref.loss_mask)] == [
        "first answer</s>",
        "second answer</s>",
    ]
    assert (ref.feature_length, ref.finished, ref.text) == (len(ref.sequence), True, "")


def test_ce_sequences_of_a_single_turn_row_append_eos_only_when_there_is_one(tiny_tokenizer):
    """Single-turn: prompt + ground truth + EOS, loss on the ground truth and EOS; no EOS token, no EOS."""
    no_eos = copy.deepcopy(tiny_tokenizer)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    for tok in (tiny_tokenizer, no_eos):
        row = make_row(tok, [user_message("question")], "the answer")
        (ref,) = ce_sequences([row], tok, structured_settings(tok))
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        target = encode(tok, "the answer") + eos
        assert ref.sequence == list(row.prompt_ids) + target
        assert ref.loss_mask == [False] * len(row.prompt_ids) + [True] * len(target)
        assert ref.prompt_length == len(row.prompt_ids)
