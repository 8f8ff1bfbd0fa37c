"""Recipes (study.recipe): the knapsack against brute force on synthetic scans with a known best answer,
the prediction and the verdicts (a planted interaction is reported), budgets and the recipe file."""

import itertools

import numpy as np
import pytest

from orchestrator import recipes
from orchestrator.errors import OrchestrateError
from orchestrator.study import recipe
from orchestrator.study.recipe import Option


def brute_force(options, budget):
    best, pick = -1, ()
    for k in range(len(options) + 1):
        for subset in itertools.combinations(options, k):
            if sum(o.cost for o in subset) <= budget + 1e-12 and sum(o.gain for o in subset) > best:
                best, pick = sum(o.gain for o in subset), subset
    return best, pick


@pytest.mark.parametrize("seed", range(20))
def test_the_knapsack_finds_the_best_mix(seed):
    rng = np.random.default_rng(seed)
    budget = 1.0
    n = int(rng.integers(3, 11))
    # costs on the knapsack's grid (so that rounding cannot matter), some free or negative; additive gains
    costs = rng.integers(-50, 900, n) * budget / recipe.RESOLUTION
    options = [Option(f"g{i}", (f"t{i}",), float(c), None, None, int(rng.integers(0, 1000))) for i, c in enumerate(costs)]
    got = recipe.choose(options, budget)
    want, _ = brute_force(options, budget)
    assert sum(o.gain for o in got) == want
    assert sum(o.cost for o in got) <= budget + 1e-12


def test_the_knapsack_on_a_known_answer():
    # the two cheap groups beat the one big one: 60 + 50 zeros for 0.4 + 0.5 against 100 for 0.9
    options = [Option("a", ("a",), 0.4, None, None, 60), Option("b", ("b",), 0.5, None, None, 50),
               Option("c", ("c",), 0.9, None, None, 100), Option("d", ("d",), -0.01, None, None, 5),
               Option("e", ("e",), 0.05, None, None, 0)]
    assert [o.group for o in recipe.choose(options, 1.0)] == ["d", "a", "b"]
    assert [o.group for o in recipe.choose(options, 0.3)] == ["d"]


def test_prediction_adds_effects_and_combines_intervals():
    chosen = [Option("a", (), 0.1, 0.07, 0.13, 1), Option("b", (), 0.2, 0.16, 0.24, 1)]
    p = recipe.predicted(chosen)
    assert p["mean"] == pytest.approx(0.3) and p["hi"] - p["mean"] == pytest.approx(0.05)  # sqrt(.03^2 + .04^2)
    assert recipe.predicted([Option("a", (), 0.1, None, None, 1)])["lo"] is None


def test_a_planted_interaction_is_reported():
    # groups that are harmless alone but hurt together: the held-out measurement lies far above the sum
    pred = recipe.predicted([Option("a", (), 0.01, 0.0, 0.02, 1), Option("b", (), 0.01, 0.0, 0.02, 1)])
    together = {"mean": 0.09, "lo": 0.08, "hi": 0.10}
    v = recipe.verdict(pred, together, 0.05)
    assert v["budget"] == "broken" and v["additive"].startswith("failed: the groups together hurt more")
    assert v["gap"] == pytest.approx(0.07)
    fine = recipe.verdict(pred, {"mean": 0.021, "lo": 0.012, "hi": 0.03}, 0.05)
    assert fine == {"budget": "kept", "additive": "held", "gap": pytest.approx(0.001)}
    assert recipe.verdict(pred, {"mean": 0.04, "lo": 0.03, "hi": 0.06}, 0.05)["budget"].startswith("not decided")


@pytest.mark.parametrize("text, words", [("kld", "QUANTITY=LIMIT"), ("ppl=1", "QUANTITY=LIMIT"),
                                         ("kld=x", "numbers"), ("kld=-1", "positive"), ("kld=nan", "positive")])
def test_bad_budgets(text, words):
    with pytest.raises(OrchestrateError, match=words):
        recipe.parse_budgets(text)


def test_budgets_sorted():
    assert [b.limit for b in recipe.parse_budgets("kld=0.1,0.02")] == [0.02, 0.1]


def test_recipe_file_round_trip(tmp_path):
    rules = ["blk.0.ffn_down.weight Q4_0_RADIUS=1", "blk.1.attn_q.weight Q4_0_RADIUS=1"]
    recipes.write_recipe(tmp_path / "r.yaml", "recipe-kld0.05", "Q4_0", rules, "from a scan")
    assert recipes.read_recipe(tmp_path / "r.yaml") == ("recipe-kld0.05", "Q4_0", rules)
    (tmp_path / "bad.yaml").write_text("rules: {a: {type: Q4_0}}\n")
    with pytest.raises(OrchestrateError, match="needs a type and a list"):
        recipes.read_recipe(tmp_path / "bad.yaml")
