"""The README's promises about the wire contract match the names the code uses."""

from __future__ import annotations

import re
from pathlib import Path

import schemas.headers as headers
from schemas import replies

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_section(heading: str) -> str:
    """The text under `heading` (a whole Markdown heading line) up to the next heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#{1,6} ", text[start:], flags=re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def documented_dlq_headers() -> list[str]:
    """Every backticked name in the contract's list of dead-letter headers, in order."""
    contract = readme_section("### The contract")
    listed = re.search(r"dead-letter topic `[^`]+` with\s+headers (.*?)\(", contract, re.DOTALL)
    assert listed, "The contract no longer lists the dead-letter headers"
    return re.findall(r"`([^`]+)`", listed.group(1))


def test_readme_lists_exactly_the_dead_letter_headers_the_consumer_sends() -> None:
    sent = [value for name, value in vars(headers).items() if name.startswith("DLQ_")]
    documented = documented_dlq_headers()
    assert len(documented) == len(set(documented)), documented
    assert sorted(documented) == sorted(sent)


def test_readme_names_every_field_of_every_result_and_only_meta_fields_that_exist() -> None:
    contract = readme_section("### The contract")
    results = contract[contract.index("Results:") :]
    for model in (
        replies.SummarizeResult,
        replies.TranslateResult,
        replies.ClassifyResult,
        replies.ChatResult,
        replies.AssistantMessage,
        replies.CancelResult,
    ):
        for field in model.model_fields:
            if field != "role":
                assert re.search(rf"[{{ ]{field}[,}}:]", results), (model.__name__, field)
    meta = re.search(r"`meta` always has (.*?)\.", contract, re.DOTALL)
    assert meta, "The contract no longer lists meta's fields"
    named = set(re.findall(r"`(\w+)`", meta.group(1))) - {"null"}
    assert named <= set(replies.Meta.model_fields), named


def test_the_readme_lists_every_setting() -> None:
    from pydantic import BaseModel

    from consumer.settings import Settings

    def names(model: type[BaseModel], prefix: str) -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                found += names(annotation, f"{prefix}{name.upper()}__")
            else:
                found.append(f"{prefix}{name.upper()}")
        return found

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [n for n in names(Settings, "OPSTREAM_") if f"| `{n}` |" not in readme]
    assert not missing, f"README's 'Every setting' table lacks {missing}"
