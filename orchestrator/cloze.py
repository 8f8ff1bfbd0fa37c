"""A cloze task from any text, for a study without a task file from the network: each question's context
is a passage of the text, its gold ending the passage's true continuation, its wrong endings
continuations taken from elsewhere in the text (never overlapping the question's own passage), chosen
from a seed. It is a proxy for real tasks: it asks whether a model still tells how this text goes on.
"""

import numpy as np

from .errors import OrchestrateError
from .taskfiles import Question

CHOICES = 4


def questions(text: str, count: int, seed: int, context_words: int = 40, ending_words: int = 12) -> list[Question]:
    """Up to count questions from text's words, in the text's order. The text is cut into windows of
    context_words + ending_words words; the questions are count of them (all, if fewer), the wrong
    endings the endings of other windows."""
    words = text.split()
    span = context_words + ending_words
    windows = len(words) // span
    if windows < CHOICES:
        raise OrchestrateError(f"the text has {len(words)} words: a cloze task needs at least "
                               f"{CHOICES * span} ({CHOICES} passages of {span} words)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(windows, size=min(count, windows), replace=False))
    ending = [" ".join(words[k * span + context_words:(k + 1) * span]) for k in range(windows)]
    out = []
    for k in chosen:
        others = [j for j in rng.permutation(windows) if j != k and ending[j] != ending[k]][:CHOICES - 1]
        if len(others) < CHOICES - 1:
            raise OrchestrateError("the text repeats itself too much for distinct wrong endings")
        gold = int(rng.integers(CHOICES))
        endings = [ending[j] for j in others]
        endings.insert(gold, ending[k])
        out.append(Question(" ".join(words[k * span:k * span + context_words]), tuple(endings), gold))
    return out
