import os
import sys
from pathlib import Path

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))  # models/tiny.py: the tiny model builders


def has_deepsparse() -> bool:
    try:
        import deepsparse  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"
