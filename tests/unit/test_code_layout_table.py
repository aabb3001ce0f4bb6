"""README's "where things are" table matches the tree: everything it names exists, and every
package of `consumer/` (and every module beside them) has a row."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSUMER = REPO / "consumer"
_ROW = re.compile(r"^\| `([^`]+)` \| (.+) \|$")
_NAMED = re.compile(r"`([\w./]+(?:\.py|/))`")


def layout_rows() -> dict[str, str]:
    """The table's rows under "## Code layout": where → its one job."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Code layout\n", 1)[1].split("\n## ", 1)[0]
    return {m[1]: m[2] for line in section.splitlines() if (m := _ROW.match(line))}


def named_paths(where: str, job: str) -> list[Path]:
    """The files and folders a row names: its own, and those its text names in backticks
    (relative to the row's folder, or to the repository when they name a top-level one)."""
    folder = CONSUMER / where if where.endswith("/") else CONSUMER
    paths = [CONSUMER / where]
    for name in _NAMED.findall(job):
        inside = folder / name
        # `schemas/signing.py` names a file of another top-level folder of the repository.
        elsewhere = REPO / name
        is_elsewhere = "/" in name.rstrip("/") and not inside.exists() and elsewhere.exists()
        paths.append(elsewhere if is_elsewhere else inside)
    return paths


def test_every_file_and_folder_the_table_names_exists() -> None:
    rows = layout_rows()
    assert rows, "README's Code layout section has no table"
    missing = [
        str(path.relative_to(REPO))
        for where, job in rows.items()
        for path in named_paths(where, job)
        if not path.exists()
    ]
    assert not missing, f"README's Code layout names what the tree lacks: {missing}"


def test_every_package_and_top_level_module_of_consumer_has_a_row() -> None:
    rows = layout_rows()
    packages = {f"{p.parent.name}/" for p in CONSUMER.glob("*/__init__.py")}
    modules = {p.name for p in CONSUMER.glob("*.py") if p.name != "__init__.py"}
    unlisted = sorted((packages | modules) - set(rows))
    assert not unlisted, f"README's Code layout has no row for: {unlisted}"


def test_the_table_check_notices_a_missing_file() -> None:
    assert not all(p.exists() for p in named_paths("bus/", "the reader (`no_such_module.py`)"))
