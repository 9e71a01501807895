"""The one prompt builder, shared by training, the online protocol and evaluation."""

from __future__ import annotations

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCTION_PLACEMENTS = ("system", "user")


def build_messages(question: str, instruction: str = DEFAULT_INSTRUCTION, placement: str = "user") -> list[dict]:
    """Chat messages for one problem: the instruction as the system turn, or appended to the user turn."""
    if placement == "system":
        return [{"role": "system", "content": instruction}, {"role": "user", "content": question}]
    if placement == "user":
        content = f"{question}\n\n{instruction}" if instruction else question
        return [{"role": "user", "content": content}]
    raise ValueError(f"instruction_placement must be system or user, got {placement!r}")


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The exact text the model sees (chat template + generation prompt), recorded verbatim in outputs."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
