"""How an instruction (plus optional preference prompts) becomes model input text.

One place for every stage: SFT, feedback generation, PPO rollouts, evaluation
and serving must build prompts identically, or a policy is evaluated on text
it never saw in training.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
"""Used for tokenizers without a chat template."""


def user_message(instruction: str, preference_prompt: str | None = None) -> str:
    """The user's turn: the instruction with the preference prompt appended, as in the paper."""
    instruction = instruction.strip()
    if preference_prompt:
        return f"{instruction} {preference_prompt.strip()}"
    return instruction


def format_prompt(
    tokenizer: PreTrainedTokenizerBase, instruction: str, preference_prompt: str | None = None
) -> str:
    """The full prompt text, ending where the model's response begins."""
    content = user_message(instruction, preference_prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(instruction=content)


def adds_special_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether to let the tokenizer add BOS etc.: not when a chat template already did."""
    return not getattr(tokenizer, "chat_template", None)
