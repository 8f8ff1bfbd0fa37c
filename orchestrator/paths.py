"""Where things live: the project checkout, the vendored tree, the cache outside the repo."""

import os
from pathlib import Path


def project() -> Path:
    """The checkout holding conf/, patches/ and vendor/.

    The package lives in <project>/orchestrator/; ORCHESTRATE_HOME points elsewhere
    (tests, or users keeping several checkouts).
    """
    env = os.environ.get("ORCHESTRATE_HOME")
    return Path(env) if env else Path(__file__).resolve().parent.parent


def conf_dir() -> Path:
    return project() / "conf"


def patches_dir() -> Path:
    return project() / "patches"


def vendor_dir() -> Path:
    return project() / "vendor" / "llama.cpp"


def build_dir() -> Path:
    return project() / "vendor" / "build"


def plots_dir() -> Path:
    return project() / "plots"


def cache_dir() -> Path:
    """Downloads and derived models are cached outside the repository."""
    env = os.environ.get("ORCHESTRATE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "orchestrate"


# What a run cache holds that are facts about files rather than results: downloads, the demo files,
# upcast bases and memos of what a model's bytes are (hash, types, a base's scan, a text's token count).
# Tests and benchmarks that measure runs start from a cache of their own that shares only these.
CACHE_FACTS = ("downloads", "demo", "bases", "model-ids.json", "model-types", "model-scans", "quant-types",
               "imatrix-check", "q8_0-hist", "token-counts")


def fresh_cache(root: Path, facts: tuple[str, ...] = CACHE_FACTS) -> Path:
    """A run cache at root with no runs, sharing the user's cache's facts (symlinked)."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in facts:
        if (cache_dir() / sub).exists():
            (root / sub).symlink_to(cache_dir() / sub)
    return root
