"""Shared fixtures. Tests never reach the network: hub look-ups fail fast."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The read-only folder of real files (../shared/realdata); tests that need it skip without it."""
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is not present")
    return REALDATA


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``--small`` synthetic dataset (dataloaders/synthetic.py, seed 0), generated once per test session."""
    from dataloaders.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_small")
    generate(root, small=True, seed=0)
    return root
