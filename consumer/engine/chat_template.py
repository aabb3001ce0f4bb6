"""Render a conversation with the model's own chat template, sandboxed, and find the token that
ends its assistant turn: the one implementation both backends use (exllamav2 reads the template
from tokenizer_config.json, llama.cpp from the GGUF's metadata)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from consumer.engine.base import ChatMessage

# A string no tokenizer will merge with its neighbours, used to locate where an
# assistant turn's content ends in the rendered template.
_PROBE = "\x00opstream-probe\x00"


class ChatTemplateError(Exception):
    """The model directory has no usable chat template, or the template failed to render."""

    code = "chat_template"


def _raise_exception(message: str) -> None:
    # Templates call raise_exception("...") to reject conversations they cannot express.
    raise ChatTemplateError(message)


def _tojson(value: object, indent: int | None = None) -> str:
    # HF's tojson keeps non-ASCII text as is; jinja2's default escapes it for HTML.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: object) -> str:
    """A special token in tokenizer_config.json is either a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else ""
    return ""


def _select_template(raw: object) -> str | None:
    """tokenizer_config.json's chat_template is a string or a list of named templates."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        named = {
            item.get("name"): item.get("template")
            for item in raw
            if isinstance(item, Mapping) and isinstance(item.get("template"), str)
        }
        default = named.get("default")
        if isinstance(default, str):
            return default
    return None


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A model's chat template plus the special-token strings it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    added_tokens: tuple[str, ...] = ()

    @classmethod
    def from_tokenizer_config(
        cls, config: Mapping[str, Any], *, fallback_source: str | None = None
    ) -> ChatTemplate:
        """Build from a parsed tokenizer_config.json (fallback: a separate chat_template.jinja)."""
        source = _select_template(config.get("chat_template")) or fallback_source
        if not source:
            raise ChatTemplateError("tokenizer_config.json has no chat_template")
        decoder = config.get("added_tokens_decoder")
        added: list[str] = []
        if isinstance(decoder, Mapping):
            added = [t for t in (_token_text(v) for v in decoder.values()) if t]
        for key in ("additional_special_tokens",):
            extra = config.get(key)
            if isinstance(extra, list):
                added.extend(t for t in (_token_text(v) for v in extra) if t)
        return cls(
            source=source,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            added_tokens=tuple(dict.fromkeys(added)),
        )

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`, ending with the assistant's generation prompt."""
        return render_chat(
            self.source,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )

    def end_of_turn(self) -> str | None:
        """The special token that closes an assistant turn (e.g. ChatML's `<|im_end|>`).

        Found by rendering a probe conversation and reading what the template writes
        right after the assistant's content; None if that is not a known token.
        """
        try:
            text = self.render(
                (ChatMessage("user", "ping"), ChatMessage("assistant", _PROBE)),
                add_generation_prompt=False,
            )
        except ChatTemplateError:
            return None
        at = text.rfind(_PROBE)
        if at < 0:
            return None
        after = text[at + len(_PROBE) :]
        candidates = [t for t in (*self.added_tokens, self.eos_token) if t and after.startswith(t)]
        return max(candidates, key=len) if candidates else None


def end_of_turn_token(
    template: ChatTemplate, token_id: Callable[[str], int | None], *, fallback: int
) -> int:
    """The id of the token that closes an assistant turn: what generation stops at, and what
    label scoring scores after every label.

    The template's own (`ChatTemplate.end_of_turn`: ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`, Gemma's `<end_of_turn>`) when it is one token of the vocabulary
    (`token_id(text)`, None otherwise); `fallback` (the model's EOS) when not.
    """
    text = template.end_of_turn()
    found = token_id(text) if text else None
    return found if found is not None else fallback


@lru_cache(maxsize=8)
def _compile(source: str) -> Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(
    source: str,
    messages: Sequence[ChatMessage],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render `messages` with a jinja2 chat template in an immutable sandbox (as HF does)."""
    try:
        return _compile(source).render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=None,
            documents=None,
        )
    except ChatTemplateError:
        raise
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def load_chat_template(model_dir: Path) -> ChatTemplate:
    """Read the chat template shipped in a HF-style model directory."""
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        raise ChatTemplateError(f"{config_path} not found")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    jinja_path = model_dir / "chat_template.jinja"
    fallback = jinja_path.read_text(encoding="utf-8") if jinja_path.is_file() else None
    return ChatTemplate.from_tokenizer_config(config, fallback_source=fallback)
