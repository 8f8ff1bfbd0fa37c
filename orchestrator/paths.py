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
