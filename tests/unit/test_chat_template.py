"""Chat templates render like HF's apply_chat_template, inside an immutable sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.engine.base import ChatMessage
from consumer.engine.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    end_of_turn_token,
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


# Llama 3 Instruct's template: BOS in the text, turns closed by <|eot_id|>, EOS another token.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma's: no system role, turns closed by <end_of_turn>, the model's role is "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


class FakeGguf:
    """A GGUF's vocabulary as `gguf_chat_template` reads it: a few special tokens by id."""

    def __init__(self, template: str | None, specials: dict[str, int], *, bos: str, eos: str):
        self.template = template
        self.ids = specials
        self.texts = {i: t for t, i in specials.items()}
        self.bos = specials[bos]
        self.eos = specials[eos]

    def metadata(self, key: str) -> str | None:
        return self.template if key == "tokenizer.chat_template" else None

    def token_text(self, token: int) -> str:
        return self.texts[token]

    def end_of_generation_tokens(self) -> list[int]:
        return [i for t, i in self.ids.items() if t not in ("<|begin_of_text|>", "<bos>")]

    def single_token(self, text: str) -> int | None:
        return self.ids.get(text)


LLAMA3_VOCAB = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|eot_id|>": 128009}
GEMMA_VOCAB = {"<bos>": 2, "<eos>": 1, "<end_of_turn>": 107}


def test_llama3_template_ends_a_turn_with_eot_id_not_eos() -> None:
    template = ChatTemplate(
        LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>", ("<|eot_id|>",)
    )
    assert template.end_of_turn() == "<|eot_id|>"
    assert template.render((ChatMessage("user", "Hi"),)) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_gguf_end_of_turn_comes_from_the_models_template_not_chatml() -> None:
    """A GGUF whose template is not ChatML scores labels against its own end-of-turn token
    (Llama 3: <|eot_id|>, Gemma: <end_of_turn>), never <|im_end|> or EOS."""
    from consumer.engine.llamacpp.backend import gguf_chat_template

    llama3 = FakeGguf(LLAMA3_TEMPLATE, LLAMA3_VOCAB, bos="<|begin_of_text|>", eos="<|end_of_text|>")
    template, end_of_turn = gguf_chat_template(llama3, "llama3.gguf")
    assert end_of_turn == 128009
    assert template.render((ChatMessage("user", "Hi"),)).startswith("<|begin_of_text|>")

    gemma = FakeGguf(GEMMA_TEMPLATE, GEMMA_VOCAB, bos="<bos>", eos="<eos>")
    template, end_of_turn = gguf_chat_template(gemma, "gemma.gguf")
    assert end_of_turn == 107
    rendered = template.render((ChatMessage("user", "Hi"), ChatMessage("assistant", "Yo")))
    assert rendered.endswith("<start_of_turn>model\nYo<end_of_turn>\n<start_of_turn>model\n")


def test_gguf_end_of_turn_falls_back_to_eos_when_the_template_names_none() -> None:
    from consumer.engine.llamacpp.backend import gguf_chat_template

    plain = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    vocab = FakeGguf(plain, GEMMA_VOCAB, bos="<bos>", eos="<eos>")
    assert gguf_chat_template(vocab, "plain.gguf")[1] == 1


def test_a_gguf_without_a_chat_template_is_refused() -> None:
    from consumer.engine.base import EngineError
    from consumer.engine.llamacpp.backend import gguf_chat_template

    with pytest.raises(EngineError, match="no chat template"):
        gguf_chat_template(FakeGguf(None, GEMMA_VOCAB, bos="<bos>", eos="<eos>"), "bare.gguf")


def test_end_of_turn_token_is_the_templates_when_it_is_one_token() -> None:
    template = ChatTemplate(GEMMA_TEMPLATE, "<bos>", "<eos>", ("<end_of_turn>",))
    assert end_of_turn_token(template, GEMMA_VOCAB.get, fallback=1) == 107
    # Not one token of this vocabulary: the fallback (EOS).
    assert end_of_turn_token(template, lambda text: None, fallback=1) == 1
