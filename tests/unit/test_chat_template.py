"""Chat templates render like HF's apply_chat_template, inside an immutable sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.engine.base import ChatMessage
from consumer.engine.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    render_chat,
)

# Qwen2.5-Instruct's template (tool branches trimmed to what the engine exercises).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- for tool in tools %}{{- tool | tojson }}{%- endfor %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' "
    "+ '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

QWEN_CONFIG = {
    "chat_template": QWEN25_TEMPLATE,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "bos_token": None,
    "added_tokens_decoder": {
        "151643": {"content": "<|endoftext|>", "special": True},
        "151644": {"content": "<|im_start|>", "special": True},
        "151645": {"content": "<|im_end|>", "special": True},
    },
}


def test_qwen_template_renders_chatml_with_generation_prompt() -> None:
    template = ChatTemplate.from_tokenizer_config(QWEN_CONFIG)
    text = template.render((ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen_template_adds_its_default_system_prompt() -> None:
    text = ChatTemplate.from_tokenizer_config(QWEN_CONFIG).render((ChatMessage("user", "Hi"),))
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_without_generation_prompt_the_assistant_turn_is_closed() -> None:
    template = ChatTemplate.from_tokenizer_config(QWEN_CONFIG)
    text = template.render(
        (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello")),
        add_generation_prompt=False,
    )
    assert text.endswith("<|im_start|>assistant\nHello<|im_end|>\n")


def test_end_of_turn_of_chatml_is_im_end() -> None:
    assert ChatTemplate.from_tokenizer_config(QWEN_CONFIG).end_of_turn() == "<|im_end|>"


def test_end_of_turn_prefers_the_longest_matching_token() -> None:
    config = {
        "chat_template": "{% for m in messages %}{{ m.content }}<|end|><|endoftext|>{% endfor %}",
        "added_tokens_decoder": {"1": {"content": "<|end|>"}, "2": {"content": "<|en"}},
    }
    assert ChatTemplate.from_tokenizer_config(config).end_of_turn() == "<|end|>"


def test_end_of_turn_is_none_when_no_special_token_follows() -> None:
    config = {"chat_template": "{% for m in messages %}{{ m.content }}\n{% endfor %}"}
    assert ChatTemplate.from_tokenizer_config(config).end_of_turn() is None


def test_bos_and_eos_given_as_added_token_dicts_are_available_to_the_template() -> None:
    config = {
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}"
        "{% endfor %}",
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": {"content": "</s>", "special": True},
    }
    text = ChatTemplate.from_tokenizer_config(config).render((ChatMessage("user", "x"),))
    assert text == "<s>x</s>"


def test_named_template_list_uses_default() -> None:
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT"},
        ]
    }
    assert ChatTemplate.from_tokenizer_config(config).source == "DEFAULT"


def test_missing_template_is_an_error() -> None:
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatTemplate.from_tokenizer_config({"eos_token": "</s>"})


def test_raise_exception_in_template_becomes_chat_template_error() -> None:
    source = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(source, (ChatMessage("user", "x"),))


def test_sandbox_blocks_attribute_escapes() -> None:
    source = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(source, (ChatMessage("user", "x"),))


def test_sandbox_is_immutable() -> None:
    source = "{% set seen = [] %}{{ seen.append(1) }}"
    with pytest.raises(ChatTemplateError):
        render_chat(source, (ChatMessage("user", "x"),))


def test_message_content_is_not_evaluated_as_template() -> None:
    source = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert render_chat(source, (ChatMessage("user", "{{ 7 * 7 }}"),)) == "{{ 7 * 7 }}"


def test_tojson_keeps_non_ascii() -> None:
    source = "{{ messages[0].content | tojson }}"
    assert render_chat(source, (ChatMessage("user", "héllo"),)) == '"héllo"'


def test_load_from_model_dir_and_jinja_fallback(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    jinja = "{% for m in messages %}[{{ m.role }}]{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(jinja)
    template = load_chat_template(tmp_path)
    assert template.render((ChatMessage("user", "x"),)) == "[user]"


def test_load_without_tokenizer_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="not found"):
        load_chat_template(tmp_path)
