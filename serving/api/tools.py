"""``tools`` / ``tool_choice``: served only where the expert's chat template takes tools and coe has a
reliable parser for that template's tool-call output; refused otherwise with a 400 naming the expert.

Capability: a chat template takes tools when its text uses the ``tools`` variable that transformers'
``apply_chat_template(..., tools=...)`` passes (:func:`template_takes_tools`). Parsing: a model's
tool calls become OpenAI ``tool_calls`` only through a parser registered for its template family in
:data:`TOOL_CALL_PARSERS`. None is registered yet: the shipped experts' templates (SmolLM2-135M-Instruct,
gemma-3-270m-it) do not take tools, so every request that asks for tools gets the 400, which says
whether the template lacks tools or coe lacks a parser for it.

A routed request (``model: "coe"``) is refused naming the expert the router chose, rather than
re-routed among tool-capable experts: with no parser registered there is no such expert.
``tool_choice: "none"`` (with or without ``tools``) is served: the tools are not rendered and the
model answers in text, as OpenAI's ``none`` promises.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from coe.errors import InvalidRequestError

# template family -> parser of a model's output into OpenAI tool calls (none yet; see the module doc)
TOOL_CALL_PARSERS: dict[str, object] = {}

_TOOLS_VAR = re.compile(r"\btools\b")


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders the ``tools`` that ``apply_chat_template(tools=...)`` passes."""
    return bool(template) and _TOOLS_VAR.search(template) is not None


@functools.lru_cache(maxsize=64)
def model_chat_template(model_ref: str) -> str | None:
    """The chat template of a model reachable from here (a built-in alias or a local folder:
    ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``); None when unknown."""
    from coe.models import resolve

    try:
        folder = Path(resolve(model_ref))
    except Exception:  # noqa: BLE001  (not prepared, not a folder: unknown here)
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
        return template if isinstance(template, str) else None
    return None


def asks_for_tools(req) -> bool:
    """Whether a chat request wants the model to (be able to) call tools: ``tools`` given and
    ``tool_choice`` not ``"none"``. 400 naming ``tool_choice`` when it names tools without ``tools``."""
    tools = getattr(req, "tools", None) or []
    choice = getattr(req, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError(f"tool_choice is {choice!r} but no tools are given; allowed without tools: "
                                      "'none' or leave it out", param="tool_choice")
        return False
    return choice != "none"


def refuse_tools(req, expert_id: str, model_ref: str | None) -> None:
    """400 naming the expert when ``req`` asks for tools (:func:`asks_for_tools`) and the expert
    (serving ``model_ref``) cannot serve them: its chat template does not take tools, or coe has no
    parser for its tool calls."""
    if not asks_for_tools(req):
        return
    model = f" (model {model_ref})" if model_ref else ""
    if template_takes_tools(model_chat_template(model_ref) if model_ref else None):
        why = f"its chat template{model} takes tools, but coe has no reliable parser for its tool-call output"
    else:
        why = f"its chat template{model} does not support tools"
    raise InvalidRequestError(
        f"tools are not supported by expert {expert_id!r}: {why}; leave tools out or send tool_choice: 'none'",
        param="tools")
