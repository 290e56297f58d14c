"""Rules of the repository's own layout that CI would otherwise only find by failing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique_across_test_folders() -> None:
    """pytest imports test modules by basename (rootdir mode, no __init__.py): two folders
    with the same file name stop the whole collection."""
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
