"""Turn a problem's question into the exact text a model is prompted with.

Contract: `render_prompt(tokenizer, question, *, instruction="", template=None,
use_chat_template=True) -> str`. With a chat model (the tokenizer has a chat template and
`use_chat_template`), the question plus instruction is one user turn followed by the
assistant generation prompt. Otherwise `template.format(prompt=question, instruction=...)`
(default "{prompt}{instruction}"), e.g. the bundled tiny model's plain "{prompt}".

The rendered text already holds any special tokens the template adds (BOS, role markers);
backends tokenize it with `workers.generation.encode_prompt`, which does not add a second BOS.
"""

from __future__ import annotations

from typing import Any

# The instructions the paper's setting uses; configs name them (see INSTRUCTIONS) or pass text.
MATH_INSTRUCTION = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = (
    "\n\nPlease reason step by step, then answer with the letter of the correct option in "
    "\\boxed{}, e.g. \\boxed{A}."
)
DEFAULT_TEMPLATE = "{prompt}{instruction}"
INSTRUCTIONS = {"none": "", "math": MATH_INSTRUCTION, "choice": CHOICE_INSTRUCTION}


def resolve_instruction(instruction: str) -> str:
    """An instruction given by name ("math", "choice", "none") or as literal text."""
    return INSTRUCTIONS.get(instruction, instruction)


def render_prompt(
    tokenizer: Any,
    question: str,
    *,
    instruction: str = "",
    template: str | None = None,
    use_chat_template: bool = True,
) -> str:
    """The prompt text for `question`; `instruction` may be a name from INSTRUCTIONS."""
    instruction = resolve_instruction(instruction)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question + instruction}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return (template or DEFAULT_TEMPLATE).format(prompt=question, instruction=instruction)
