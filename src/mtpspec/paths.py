"""Where mtpspec keeps what it builds once and reuses: converted models, compiled kernels, probe results.

All of it lives under one cache root, `$MTPSPEC_CACHE` (default `~/.cache/mtpspec`), so deleting
that directory returns the machine to a fresh install. This is the ground floor: it imports
nothing from mtpspec, so every layer may read it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MTPSPEC_CACHE"


def cache_root() -> Path:
    """Read on every call, so tests and users can point it elsewhere at any time."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mtpspec"))


def models_dir() -> Path:
    """Hugging Face directories converted from GGUF files, one per file version."""
    return cache_root() / "models"


def kernels_dir() -> Path:
    """Compiled C++ extensions, one directory per build name (a hash of sources and flags)."""
    return cache_root() / "kernels"


def row_invariance_store() -> Path:
    """The row-invariance probe's answers, keyed by everything that can change them."""
    return cache_root() / "row-invariance.json"
