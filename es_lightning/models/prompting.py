"""Render prompts for a model: optional chat template, then the completion appended verbatim."""

from __future__ import annotations


def render_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    """The text a model sees before the completion: the prompt, or the chat-formatted user turn."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat_template: true, but this model's tokenizer has no chat template. Set chat_template: false "
            "for this model in the config."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def render_example(tokenizer, prompt: str, completion: str, chat_template: bool) -> str:
    """Prompt (chat-formatted if asked) followed by the completion; a chat turn drops the completion's leading space."""
    if chat_template:
        return render_prompt(tokenizer, prompt, True) + completion.lstrip()
    return prompt + completion
