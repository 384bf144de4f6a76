import pytest

from lieq_export.allocate import (
    allocate, allocate_knapsack, allocate_two, baseline_scores, damage_from_scores, parse_pins, uniform_bits,
)
from lieq_export.plan import PlanError

SCORES = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2]
EQUAL = [100] * 6


def avg(bits, params):
    return sum(b * n for b, n in zip(bits, params)) / sum(params)


def test_two_width_top_layers_by_score():
    bits = allocate_two(SCORES, EQUAL, (2, 4), 2 + 2 * 2 / 6)  # room for exactly two 4-bit layers
    assert bits == (2, 4, 2, 4, 2, 2)
    assert allocate_two(SCORES, EQUAL, (2, 4), 2.0) == (2,) * 6
    assert allocate_two(SCORES, EQUAL, (2, 4), 4.0) == (4,) * 6


def test_two_width_weighs_layers_by_parameters_and_never_exceeds_budget():
    params = [100, 400, 100, 100, 100, 100]  # the top layer is 4x larger
    budget = 2 + 2 * 550 / 900  # room for 550 of the 900 parameters at 4 bits
    bits = allocate_two(SCORES, params, (2, 4), budget)
    assert avg(bits, params) <= budget + 1e-12
    # 0.9 (400) and 0.7 (100) fit; 0.5 would overshoot, and the ranking is a prefix: it stops there
    assert bits == (2, 4, 2, 4, 2, 2)
    assert allocate_two(SCORES, params, (2, 4), 2 + 2 * 300 / 900) == (2,) * 6  # the top layer alone overshoots


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.2, 3.9, 4.0])
def test_three_widths_meet_budget_and_follow_scores(budget):
    bits = allocate(SCORES, EQUAL, (2, 3, 4), budget)
    assert avg(bits, EQUAL) <= budget + 1e-12
    assert avg(bits, EQUAL) > budget - 1 / 6 - 1e-12  # a leftover smaller than one layer-bit step
    order = sorted(range(6), key=lambda i: SCORES[i])
    assert [bits[i] for i in order] == sorted(bits)  # higher score never gets fewer bits


def test_knapsack_is_exact_on_a_brute_force_case():
    import itertools

    damage = damage_from_scores(SCORES, (2, 3, 4))
    params = [100, 200, 100, 300, 100, 200]
    budget = 3.1
    best = min(
        (c for c in itertools.product((2, 3, 4), repeat=6) if avg(c, params) <= budget + 1e-12),
        key=lambda c: sum(damage[i][b] for i, b in enumerate(c)),
    )
    assert allocate_knapsack(damage, params, (2, 3, 4), budget) == best


def test_pins():
    bits = allocate(SCORES, EQUAL, (2, 4), 2 + 2 * 2 / 6, pins={0: 4})
    assert bits[0] == 4 and sum(b == 4 for b in bits) == 2 and bits[1] == 4
    assert allocate(SCORES, EQUAL, (2, 3, 4), 3.0, pins={5: 4})[5] == 4
    assert parse_pins(["0=4", "5=8"]) == {0: 4, 5: 8}


def test_baselines():
    assert baseline_scores("reversed", SCORES) == [-s for s in SCORES]
    r0 = baseline_scores("random", n_layers=6, seed=0)
    assert r0 == baseline_scores("random", n_layers=6, seed=0) != baseline_scores("random", n_layers=6, seed=1)
    assert baseline_scores("oracle", SCORES, oracle=[3, 2, 1]) == [3, 2, 1]
    assert uniform_bits(3, (2, 4), 4) == (4, 4, 4)


def test_bad_allocation_inputs():
    with pytest.raises(PlanError, match="budget 1.5 is outside what widths \\[2, 4\\] can give"):
        allocate(SCORES, EQUAL, (2, 4), 1.5)
    with pytest.raises(PlanError, match="budget 4.2 is outside"):
        allocate(SCORES, EQUAL, (2, 3, 4), 4.2)
    with pytest.raises(PlanError, match="pinned layer 9 does not exist"):
        allocate(SCORES, EQUAL, (2, 4), 3, pins={9: 4})
    with pytest.raises(PlanError, match="pinned to 8 bits, which is not among the widths"):
        allocate(SCORES, EQUAL, (2, 4), 3, pins={0: 8})
    with pytest.raises(PlanError, match="pinned layers alone need 3.333 average bits"):
        allocate(SCORES, EQUAL, (2, 4), 3.0, pins={i: 4 for i in range(4)})
    with pytest.raises(PlanError, match="needs ΔPPL scores"):
        baseline_scores("oracle", SCORES)
    with pytest.raises(PlanError, match="allocator 'best' is unknown"):
        baseline_scores("best", SCORES)
    with pytest.raises(PlanError, match="uniform plan needs --avg-bits equal to one width"):
        uniform_bits(3, (2, 4), 3.0)
    with pytest.raises(PlanError, match="must look like LAYER=BITS"):
        parse_pins(["0:4"])
