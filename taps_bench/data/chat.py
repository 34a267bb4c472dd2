"""A conversation rendered through a target's chat template: the one place that knows how a target card shapes it
(its system prompt, its template override, its template options). Prompts of tasks, training conversations and
lm-eval's chat-formatted requests all go through here, so a target means the same text everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taps_bench.catalog.cards import TargetCard
from taps_bench.errors import UserError


def render_chat(tokenizer: Any, target: TargetCard, messages: Sequence[dict[str, str]], *, generation_prompt: bool,
                continue_final: bool = False, with_system_prompt: bool = True) -> str:
    """`messages` as text through the target's chat template. `generation_prompt`: open the assistant's turn after
    them; `continue_final`: leave the final (assistant) message open, to be continued. `with_system_prompt`: put the
    card's system prompt first when it declares one (with None the template's own default, if any, applies, which
    is what the target's authors intended); lm-eval passes its own system message, so it renders without it."""
    if target.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"target '{target.name}': its tokenizer has no chat template; set chat_template in the "
                        "target card")
    system = [{"role": "system", "content": target.system_prompt}] if with_system_prompt and \
        target.system_prompt is not None else []
    kwargs: dict[str, Any] = dict(target.chat_template_kwargs)
    if target.chat_template is not None:
        kwargs["chat_template"] = target.chat_template
    # Not the card's to change: callers need text, and whether the assistant's turn is opened is theirs to say.
    kwargs["tokenize"] = False
    kwargs["add_generation_prompt"] = generation_prompt
    if continue_final:
        kwargs["continue_final_message"] = True
    text = tokenizer.apply_chat_template([*system, *(dict(m) for m in messages)], **kwargs)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text
