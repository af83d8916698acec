"""Named chat templates (the ``chat_template`` key) and the choice of the template a tokenizer renders with.

A base model often ships without a chat template, while chat data needs one. ``chat_template`` names a
model family's chat format and that template is set on the tokenizer before any data is read; it is
saved with the tokenizer in every checkpoint and in the final output, so inference renders prompts the
way training did. The templates below are written for ebft from each family's published prompt format:

* ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message; no BOS, no default system.
* ``qwen_25``: ChatML, with Qwen2.5's default system message when the conversation has none.
* ``qwen3``: ChatML; an assistant turn after the last user message renders its reasoning as
  ``<think>\\n{reasoning}\\n</think>\\n\\n`` before the answer (reasoning from ``reasoning_content`` or a
  ``<think>...</think>`` prefix of the content), earlier assistant turns drop their reasoning, and
  ``enable_thinking: false`` (``trl.chat_template_kwargs``) adds an empty think block to the
  generation prompt.
* ``llama3``: ``<|begin_of_text|>``, then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  per message (content trimmed).
* ``llama3_2_vision`` (text-only conversations): Llama 3.2's format, ``llama3`` with a system header that
  always states the knowledge cut-off and the date (``date_string``, default ``26 Jul 2024``).
* ``gemma``: ``<bos>``, then ``<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n`` (content trimmed);
  Gemma has no system role, so a system message is put before the first user message, a blank line between.
* ``phi_3``: ``<|{role}|>\\n{content}<|end|>\\n`` per message (system, user, assistant); no BOS.
* ``mistral_v1``, ``mistral_v2v3``, ``mistral_v3_tekken``: ``<s>``, then ``[INST] ... [/INST]`` around each
  user message and ``</s>`` after each answer, with the spacing of each tokenizer version
  (v1 `` [INST] q [/INST] a</s>``, v2/v3 ``[INST] q[/INST] a</s>``, v3-tekken ``[INST]q[/INST]a</s>``);
  no system role, so a system message is put before the first user message, a blank line between.
* ``mistral_v7_tekken``: as ``mistral_v3_tekken`` with ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`` system turns.

Besides these names: ``tokenizer_default`` (the tokenizer's own template; an error if it has none),
``tokenizer_default_fallback_<name>`` (the tokenizer's own, else ``<name>``) and ``jinja`` (the template
in ``chat_template_jinja``: Jinja text, or the path of a file holding it). Unset, the tokenizer's own
template is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_CHATML_TURNS = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
)
_CHATML_PROMPT = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"

CHATML = _CHATML_TURNS + _CHATML_PROMPT

QWEN_25 = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}" + CHATML
)

# Reasoning: message.reasoning_content, else the part of the content before '</think>' (after '<think>').
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string else '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1] %}"
    "{%- endif %}"
    "{%- set content = content.lstrip('\\n') %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{{- content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_LLAMA3_TURNS = (
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

LLAMA3 = "{{- '<|begin_of_text|>' }}" + _LLAMA3_TURNS

LLAMA3_2_VISION = (
    "{{- '<|begin_of_text|>' }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: '"
    " + date_string + '\\n\\n' + system + '<|eot_id|>' }}" + _LLAMA3_TURNS
)

# A leading system message becomes the first lines of the first user message (families without a system role).
_SYSTEM_INTO_FIRST_USER = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
)

GEMMA = (
    "{{- '<bos>' }}" + _SYSTEM_INTO_FIRST_USER + "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{%- set content = (system + message['content']) if loop.first else message['content'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + content | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

PHI_3 = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


def _mistral(open_inst: str, close_inst: str, answer: str, system: str | None = None) -> str:
    """A Mistral instruct template: ``open_inst`` + question + ``close_inst`` per user message, ``answer`` +
    content + ``</s>`` per assistant message; system turns as ``system`` or put before the first user message."""
    turns = (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        "{%- set content = (system + message['content']) if loop.first else message['content'] %}"
        f"{{{{- '{open_inst}' + content + '{close_inst}' }}}}"
        "{%- elif message['role'] == 'assistant' %}"
        f"{{{{- '{answer}' + message['content'] + '</s>' }}}}"
    )
    if system is not None:
        turns += f"{{%- elif message['role'] == 'system' %}}{{{{- {system} }}}}"
        return "{{- '<s>' }}{%- set system = '' %}" + turns + "{%- endif %}{%- endfor %}"
    return "{{- '<s>' }}" + _SYSTEM_INTO_FIRST_USER + turns + "{%- endif %}{%- endfor %}"


MISTRAL_V1 = _mistral(" [INST] ", " [/INST]", " ")
MISTRAL_V2V3 = _mistral("[INST] ", "[/INST]", " ")
MISTRAL_V3_TEKKEN = _mistral("[INST]", "[/INST]", "")
MISTRAL_V7_TEKKEN = _mistral(
    "[INST]", "[/INST]", "", system="'[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]'"
)

TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "qwen_25": QWEN_25,
    "qwen3": QWEN3,
    "llama3": LLAMA3,
    "llama3_2_vision": LLAMA3_2_VISION,
    "gemma": GEMMA,
    "phi_3": PHI_3,
    "mistral_v1": MISTRAL_V1,
    "mistral_v2v3": MISTRAL_V2V3,
    "mistral_v3_tekken": MISTRAL_V3_TEKKEN,
    "mistral_v7_tekken": MISTRAL_V7_TEKKEN,
}

# The token that ends a turn in each format: a stop token the model must be able to emit as one token.
TURN_ENDS: dict[str, str] = {
    "chatml": "<|im_end|>",
    "qwen_25": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "llama3_2_vision": "<|eot_id|>",
    "gemma": "<end_of_turn>",
    "phi_3": "<|end|>",
    "mistral_v1": "</s>",
    "mistral_v2v3": "</s>",
    "mistral_v3_tekken": "</s>",
    "mistral_v7_tekken": "</s>",
}

TOKENIZER_DEFAULT = "tokenizer_default"
FALLBACK_PREFIX = "tokenizer_default_fallback_"
JINJA = "jinja"

# axolotl's other template names: accepted by its schema, not shipped here.
AXOLOTL_ONLY = (
    "alpaca",
    "aya",
    "cohere",
    "command_a",
    "command_a_rag",
    "command_a_tool_use",
    "deepseek_v2",
    "deepseek_v3",
    "exaone",
    "exaone4",
    "falcon_h1",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4_unified",
    "jamba",
    "llama4",
    "llava",
    "metharme",
    "nemotron_h",
    "phi_35",
    "pixtral",
    "qwen2_vl",
    "qwen3_5",
)


def choice_problem(name: str | None, jinja: str | None) -> str | None:
    """Why ``chat_template: name`` with ``chat_template_jinja: jinja`` cannot be used (None when it can).
    Reads no file: whether a jinja path exists is checked before training (``template_text``)."""
    if name is None or name == JINJA:
        return None if name is None or jinja else "jinja needs the template in chat_template_jinja"
    base = name[len(FALLBACK_PREFIX) :] if name.startswith(FALLBACK_PREFIX) else name
    if name != TOKENIZER_DEFAULT and base not in TEMPLATES:
        names = ", ".join([*TEMPLATES, TOKENIZER_DEFAULT, FALLBACK_PREFIX + "<name>", JINJA])
        if base in AXOLOTL_ONLY:
            return (
                f"{base!r} is one of axolotl's templates that ebft does not ship; use tokenizer_default (the "
                f"model's own template), jinja with chat_template_jinja, or one of: {names}"
            )
        return f"unknown chat template {base!r}; one of: {names}"
    if jinja is not None:
        return f"chat_template_jinja is only read with chat_template: jinja (got chat_template: {name})"
    return None


def template_text(jinja: str) -> str:
    """``chat_template_jinja``'s template: the text of the file it names, else the value itself."""
    if "{" not in jinja and "\n" not in jinja:
        path = Path(jinja).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such template file {jinja!r} (give the Jinja text itself, or a file path)")
        return path.read_text(encoding="utf-8")
    return jinja


@dataclass(frozen=True)
class Chosen:
    """The template a tokenizer renders with: its text (None = the tokenizer's own, unchanged), the name it
    goes by in the log, and the token that ends each turn in it (None when unknown)."""

    text: str | None
    name: str
    turn_end: str | None


def choose(name: str | None, jinja: str | None, own: str | None) -> Chosen:
    """The template for ``chat_template: name`` (and ``chat_template_jinja: jinja``) given the tokenizer's own
    template ``own``. ValueError says why there is none (``tokenizer_default`` on a tokenizer without one)."""
    problem = choice_problem(name, jinja)
    if problem is not None:
        raise ValueError(problem)
    if name is None and jinja is None:
        return Chosen(None, "the tokenizer's own", None)
    if name in (None, JINJA):
        # choice_problem refuses jinja without chat_template_jinja, and no name and no jinja returned above.
        assert jinja is not None
        return Chosen(template_text(jinja), "chat_template_jinja", None)
    if name == TOKENIZER_DEFAULT or name.startswith(FALLBACK_PREFIX):
        if own:
            return Chosen(None, "the tokenizer's own", None)
        if name == TOKENIZER_DEFAULT:
            raise ValueError(
                "tokenizer_default: the tokenizer has no chat template; name one (e.g. chatml, llama3) or use "
                "tokenizer_default_fallback_<name>"
            )
        name = name[len(FALLBACK_PREFIX) :]
    return Chosen(TEMPLATES[name], name, TURN_ENDS[name])
