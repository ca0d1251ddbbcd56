import os
import pathlib

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "token")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
NORMAN_SUBSET = SHARED / "data" / "norman19_k562_subset.h5ad"


@pytest.fixture(scope="session")
def norman_path() -> pathlib.Path:
    if not NORMAN_SUBSET.is_file():
        pytest.skip(f"real Norman subset not found at {NORMAN_SUBSET} (expected ../shared beside the repo)")
    return NORMAN_SUBSET
