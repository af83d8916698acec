"""``chat_template``: axolotl's template names set on a tokenizer that has none.

Each named template renders one conversation (system, user, assistant, user, generation prompt) as the
model family's published prompt format, written out by hand below; the template is applied before any
data is read, so structured chat data trains on a base tokenizer without a template, and it is saved with
the tokenizer in the checkpoints and the output folder. On the code before this change ``chat_template``
was ignored with a warning and such a run failed with "the tokenizer has no chat_template".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from ebft.cli import main
from ebft.config import load_config
from ebft.errors import ConfigError
from ebft.modeling.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]

# The published formats, by hand (not generated from the templates under test).
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "qwen_25": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama3_2_vision": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
    "phi_3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n"
    "<|assistant|>\n",
    "mistral_v1": "<s> [INST] Be brief.\n\nHi [/INST] Hello!</s> [INST] 2+2? [/INST]",
    "mistral_v2v3": "<s>[INST] Be brief.\n\nHi[/INST] Hello!</s>[INST] 2+2?[/INST]",
    "mistral_v3_tekken": "<s>[INST]Be brief.\n\nHi[/INST]Hello!</s>[INST]2+2?[/INST]",
    "mistral_v7_tekken": "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>[INST]2+2?[/INST]",
}


@pytest.fixture(scope="module")
def bare_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that has no chat template (as many base checkpoints)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-no-template")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(out)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    return out


def _cfg(model_dir: Path, tmp_path: Path, **keys):
    raw = {
        "base_model": str(model_dir),
        "rl": "ebft",
        "ebft": {"mode": "structured"},
        "micro_batch_size": 4,
        "datasets": [{"path": str(tmp_path / "chat.jsonl"), "type": "ebft_chat_multiturn.transform"}],
        **keys,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _render(tokenizer, messages=CONVERSATION, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_named_template_renders_the_published_format(name, bare_model_dir, tmp_path):
    tokenizer = load_tokenizer(load_config(_cfg(bare_model_dir, tmp_path, chat_template=name)))
    assert _render(tokenizer) == EXPECTED[name]


def test_qwen_25_adds_its_default_system_message_and_qwen3_its_think_blocks(bare_model_dir, tmp_path):
    qwen25 = load_tokenizer(load_config(_cfg(bare_model_dir, tmp_path, chat_template="qwen_25")))
    assert _render(qwen25, CONVERSATION[1:2]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    qwen3 = load_tokenizer(load_config(_cfg(bare_model_dir, tmp_path, chat_template="qwen3")))
    # An answer after the last question keeps its reasoning in a think block; earlier answers drop theirs.
    finished = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>one and one</think>\n\n2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
    ]
    text = qwen3.apply_chat_template(finished, tokenize=False)
    assert text == (
        "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\ntwo and two\n</think>\n\n4<|im_end|>\n"
    )
    quiet = _render(qwen3, CONVERSATION[1:2], enable_thinking=False)
    assert quiet == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_tokenizer_default_and_its_fallback(bare_model_dir, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="chat_template: tokenizer_default: the tokenizer has no chat template"):
        load_tokenizer(load_config(_cfg(bare_model_dir, tmp_path, chat_template="tokenizer_default")))
    fallback = _cfg(bare_model_dir, tmp_path, chat_template="tokenizer_default_fallback_chatml")
    assert _render(load_tokenizer(load_config(fallback))) == EXPECTED["chatml"]
    # A tokenizer with its own template keeps it under both choices.
    own = _render(load_tokenizer(load_config(_cfg(tiny_model_dir, tmp_path))))
    for choice in ("tokenizer_default", "tokenizer_default_fallback_chatml"):
        tokenizer = load_tokenizer(load_config(_cfg(tiny_model_dir, tmp_path, chat_template=choice)))
        assert _render(tokenizer) == own != EXPECTED["chatml"]


def test_jinja_template_as_text_or_file(bare_model_dir, tmp_path):
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    expected = "[system] Be brief.\n[user] Hi\n[assistant] Hello!\n[user] 2+2?\n"
    inline = _cfg(bare_model_dir, tmp_path, chat_template="jinja", chat_template_jinja=jinja)
    assert _render(load_tokenizer(load_config(inline))) == expected
    (tmp_path / "t.jinja").write_text(jinja)
    # chat_template left out: chat_template_jinja alone means jinja (as in axolotl).
    from_file = _cfg(bare_model_dir, tmp_path, chat_template_jinja=str(tmp_path / "t.jinja"))
    assert _render(load_tokenizer(load_config(from_file))) == expected


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"chat_template": "chatml2"}, "chat_template: unknown chat template 'chatml2'; one of: chatml, qwen_25"),
        ({"chat_template": "cohere"}, "chat_template: 'cohere' is one of axolotl's templates that ebft does not ship"),
        ({"chat_template": "tokenizer_default_fallback_nope"}, "chat_template: unknown chat template 'nope'"),
        ({"chat_template": "jinja"}, "chat_template: jinja needs the template in chat_template_jinja"),
        (
            {"chat_template": "chatml", "chat_template_jinja": "{{ x }}"},
            "chat_template_jinja: chat_template_jinja is only read with chat_template: jinja",
        ),
    ],
)
def test_bad_choices_fail_validation(keys, message, bare_model_dir, tmp_path, capsys):
    assert main(["validate", str(_cfg(bare_model_dir, tmp_path, **keys))]) == 2
    assert message in capsys.readouterr().err


def test_structured_chat_data_trains_with_chatml_on_a_tokenizer_without_one(bare_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}."}]}
        for w in ("red", "green", "blue", "black")
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    config = _cfg(
        bare_model_dir,
        tmp_path,
        chat_template="chatml",
        max_steps=2,
        save_steps=1,
        sequence_len=64,
        output_dir=str(out),
        trl={"num_generations": 4, "max_completion_length": 8},
    )
    assert main(["train", str(config)]) == 0
    log = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "chat_template: rendering chats with chatml (the tokenizer had none)" in log
    # The tiny vocabulary has no <|im_end|> token: said once, with the fix.
    assert log.count("chatml ends each turn with '<|im_end|>', which this tokenizer splits") == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # Saved with the model: the output folder's tokenizer and each checkpoint's render with chatml.
    for folder in (out, out / "checkpoint-1"):
        assert _render(AutoTokenizer.from_pretrained(folder)) == EXPECTED["chatml"]


def test_a_turn_end_that_is_not_a_stop_token_is_named(bare_model_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    folder = tmp_path / "with-im-end"
    tokenizer = AutoTokenizer.from_pretrained(bare_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tokenizer.save_pretrained(folder)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with caplog.at_level(logging.WARNING, logger="ebft"):
        load_tokenizer(
            load_config(_cfg(bare_model_dir, tmp_path, tokenizer_config=str(folder), chat_template="chatml"))
        )
    assert [r.getMessage() for r in caplog.records] == [
        f"chat_template: chatml ends each turn with '<|im_end|>' (id {im_end}), which is not the tokenizer's eos "
        f"'</s>', so a completion does not stop there; add {im_end} to trl.generation_kwargs.stop_token_ids"
    ]
    caplog.clear()
    stops = {"trl": {"num_generations": 4, "generation_kwargs": {"stop_token_ids": [im_end]}}}
    with caplog.at_level(logging.WARNING, logger="ebft"):
        load_tokenizer(
            load_config(_cfg(bare_model_dir, tmp_path, tokenizer_config=str(folder), chat_template="chatml", **stops))
        )
    assert caplog.records == []
