r"""Named chat templates and the choice between them (`data.chat_template`).

- auto: the tokenizer's own `chat_template`; ChatML when it has none (base models).
- chatml: `<|im_start|>{role}\n{content}<|im_end|>\n` per turn (Yi, Qwen, SmolLM2); generation prompt
  `<|im_start|>assistant\n`.
- llama3: `<|begin_of_text|>` once, then `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`;
  generation prompt `<|start_header_id|>assistant<|end_header_id|>\n\n`.
- alpaca: the Alpaca preamble (or the system message) + `\n\n`, then `### Instruction:\n{user}\n\n` and
  `### Response:\n{reply}{eos}`; generation prompt `### Response:\n`.
- plain: each prompt message's content followed by `\n`, then `{reply}{eos}`; no generation prompt.

`plain` is the layout ftray used before named templates existed for tokenizers without a template;
`auto` now falls back to ChatML instead, as the instruction-tuning spec asks. Contents are never
trimmed (Meta's own Llama-3 template trims them), so that character spans inside a reply survive.
A turn that follows an assistant reply in `alpaca` and `plain` starts with the separator, so a
one-turn conversation ends exactly at the eos token.

Every name is a Jinja template rendered by the tokenizer's own `apply_chat_template`; only the
choice and the end-of-turn marker are ftray's.
"""

from __future__ import annotations

from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set turns = messages[1:] %}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if loop.previtem is defined and loop.previtem['role'] == 'assistant' %}{{ '\n\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + (eos_token or '') }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
PLAIN = (
    "{% for message in messages %}"
    "{% if loop.previtem is defined and loop.previtem['role'] == 'assistant' %}{{ '\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + (eos_token or '') }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
)
TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "plain": PLAIN}
CHAT_TEMPLATE_NAMES = ("auto", *TEMPLATES)
# the text that ends an assistant turn, when it is not simply the tokenizer's eos token
_END_OF_TURN = {CHATML: "<|im_end|>", LLAMA3: "<|eot_id|>"}


def template_text(tokenizer: Any, name: str = "auto") -> str | None:
    """The Jinja template `name` renders with, or None for the tokenizer's own (auto with a template)."""
    if name == "auto":
        return None if getattr(tokenizer, "chat_template", None) else CHATML
    if name not in TEMPLATES:
        raise ValueError(f"data.chat_template: unknown template {name!r}; choose one of {', '.join(CHAT_TEMPLATE_NAMES)}")
    return TEMPLATES[name]


def render_chat(messages: list[dict], tokenizer: Any, name: str = "auto", add_generation_prompt: bool = False) -> str:
    """`messages` rendered as text with the chosen template (optionally ending in the generation prompt)."""
    return tokenizer.apply_chat_template(messages, chat_template=template_text(tokenizer, name),
                                         add_generation_prompt=add_generation_prompt, tokenize=False)


def use_chat_template(tokenizer: Any, name: str = "auto") -> Any:
    """Set `tokenizer.chat_template` to the chosen template (in place), so that anything that renders
    with the tokenizer's own template (generation, serving, a saved checkpoint) matches training."""
    text = template_text(tokenizer, name)
    if text is not None:
        tokenizer.chat_template = text
    return tokenizer


def stop_strings(tokenizer: Any) -> list[str]:
    """End-of-turn text that generation must stop at because it is not the eos token (a named template
    on a tokenizer whose vocabulary lacks its markers, e.g. ChatML on a base model); usually []."""
    marker = _END_OF_TURN.get(getattr(tokenizer, "chat_template", None) or "")
    return [marker] if marker and marker != tokenizer.eos_token else []


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first stop string."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text
