"""Where magpie keeps what it derives once per machine (model exports, CPU probes, wheels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MAGPIE_CACHE_DIR, else ~/.cache/magpie."""
    return Path(os.environ.get("MAGPIE_CACHE_DIR") or Path.home() / ".cache" / "magpie")
