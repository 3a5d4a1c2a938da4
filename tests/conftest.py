"""Shared fixtures: the real sample data folder (MGI_TEST_DATA) and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout under test."""
    return REPO


@pytest.fixture(scope="session")
def test_data() -> Path:
    """Folder of real sample files (MGI_TEST_DATA, default ../shared/data); skips if absent."""
    folder = Path(os.environ.get("MGI_TEST_DATA", REPO.parent / "shared" / "data"))
    if not folder.is_dir():
        pytest.skip(f"real sample data not found at {folder} (set MGI_TEST_DATA)")
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the test files marked slow first, each file's tests in their order.

    With `-n auto --dist loadfile` a file stays on one worker: started first, the few long
    workflow files are shared out while the many short files fill the gaps at the end, rather
    than one worker running a long file alone after the other has finished.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
