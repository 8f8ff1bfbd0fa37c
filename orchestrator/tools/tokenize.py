"""llama-tokenize: how many tokens a text is for a model, so that a study can refuse a text too short for
what it asks before any work. Counted once per (fork, model, text) content."""

import re
import subprocess
from pathlib import Path

from .. import paths
from ..errors import OrchestrateError
from ..files import memoized
from ..fork.build import Fork
from ..proc import clean_env, failure_reason

COUNT = re.compile(r"Total number of tokens: (\d+)")


def count_tokens(fork: Fork, model: Path, model_id: str, text: Path, text_id: str) -> int:
    """Tokens of text for model's vocabulary, as llama-perplexity counts them (with the BOS the model
    adds; the file read as it is, no escapes), from the vocabulary alone (no weights are loaded)."""
    return memoized(paths.cache_dir() / "token-counts" / f"{model_id[:16]}-{text_id[:16]}-{fork.id}.json",
                    lambda: {"tokens": _counted(fork, model, text)}, lambda d: d["tokens"])


def _counted(fork: Fork, model: Path, text: Path) -> int:
    cmd = [str(fork.binary("llama-tokenize")), "-m", str(model), "-f", str(text), "--ids", "--show-count",
           "--no-escape", "--log-disable"]
    res = subprocess.run(cmd, capture_output=True, env=clean_env())
    out = res.stdout.decode("utf-8", "replace") + res.stderr.decode("utf-8", "replace")
    m = COUNT.search(out)
    if res.returncode != 0 or not m:
        raise OrchestrateError(f"llama-tokenize could not count the tokens of {text} ({failure_reason(out)})")
    return int(m.group(1))


def check_text(tokens: int, ctx: int, chunks: int, text: Path) -> int:
    """The chunks llama-perplexity will score of a text of `tokens` tokens, or a one-line error when the
    text is too short for one pass (two windows of ctx) or for the chunks asked (0: all)."""
    need = max(2 * ctx, chunks * ctx)
    if tokens < need:
        asked = f"{chunks} chunks of -c {ctx}" if chunks else f"-c {ctx} (llama-perplexity needs two windows)"
        raise OrchestrateError(f"text {text} is {tokens} tokens for this model; {asked} need{'s' if not chunks else ''} "
                               f"{need}: give a longer text, fewer --chunks or a smaller --ctx")
    return chunks or tokens // ctx
