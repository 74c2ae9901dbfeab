"""The timing protocol of pikv_jax.bench on a fake clock: interleaving order, medians, ranges,
ratios and the goal rule. No real timing is asserted."""

import pytest

from pikv_jax import bench as B


class FakeClock:
    """A clock that moves only when a configuration 'runs' for a known duration."""

    def __init__(self):
        self.now = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def run(self, seconds: float):
        self.now += seconds
        return seconds


def scripted(clock: FakeClock, durations: dict[str, list[float]], calls: list[str]):
    """Configurations whose i-th call lasts durations[name][i] (warm-up calls included)."""
    counters = {n: 0 for n in durations}

    def make(name):
        def call():
            calls.append(name)
            d = durations[name][counters[name]]
            counters[name] += 1
            return clock.run(d)
        return call

    return {n: make(n) for n in durations}


# warm-up value first, then 5 timed rounds
DURATIONS = {"A": [9.0, 4.0, 2.0, 3.0, 1.0, 5.0],
             "B": [7.0, 2.0, 1.0, 1.5, 0.5, 4.0],
             "C": [0.5, 10.0, 10.0, 10.0, 10.0, 20.0]}


def test_rounds_interleave_and_record_every_value():
    clock, calls = FakeClock(), []
    res = B.interleaved_rounds(scripted(clock, DURATIONS, calls), rounds=5, warmup=1, clock=clock)
    # round r calls A, then B, then C; the warm-up round is round -1
    assert calls == ["A", "B", "C"] * 6
    assert res.order == [(r, n) for r in range(-1, 5) for n in "ABC"]
    assert clock.reads == 2 * 18
    assert res.warmup == {"A": [9.0], "B": [7.0], "C": [0.5]}
    assert res.values["A"] == [4.0, 2.0, 3.0, 1.0, 5.0]
    assert res.stats("A") == {"median": 3.0, "min": 1.0, "max": 5.0, "rounds": [4.0, 2.0, 3.0, 1.0, 5.0]}
    assert res.stats("B") == {"median": 1.5, "min": 0.5, "max": 4.0, "rounds": [2.0, 1.0, 1.5, 0.5, 4.0]}
    assert res.stats("C")["median"] == 10.0 and res.stats("C")["max"] == 20.0


def test_rounds_self_timed_and_on_round():
    seen = []
    vals = {"x": iter([0.0, 5.0, 7.0, 6.0, 8.0]), "y": iter([0.0, 1.0, 2.0, 4.0, 3.0])}
    res = B.interleaved_rounds({n: (lambda v=v: next(v)) for n, v in vals.items()}, rounds=4, warmup=1,
                               self_timed=True, on_round=lambda r, v: seen.append((r, v)))
    assert res.stats("x")["median"] == 6.5 and res.stats("y")["median"] == 2.5  # even count: mean of the middle
    assert seen == [(0, {"x": 5.0, "y": 1.0}), (1, {"x": 7.0, "y": 2.0}), (2, {"x": 6.0, "y": 4.0}),
                    (3, {"x": 8.0, "y": 3.0})]
    with pytest.raises(ValueError):
        B.interleaved_rounds({"x": lambda: 1.0}, rounds=0)


def test_ratio_of_medians_with_per_round_range():
    clock, calls = FakeClock(), []
    res = B.interleaved_rounds(scripted(clock, DURATIONS, calls), rounds=5, clock=clock)
    r = res.ratio("B", "A")
    assert r["median"] == 1.5 / 3.0
    assert r["rounds"] == [0.5, 0.5, 0.5, 0.5, 0.8]
    assert (r["min"], r["max"]) == (0.5, 0.8) and r["range_from"] == B.RANGE_PER_ROUND
    cons = B.ratio_spread(res.values["B"], res.values["A"], paired=False)
    assert cons["median"] == 0.5 and (cons["min"], cons["max"]) == (0.5 / 5.0, 4.0 / 1.0)
    assert cons["range_from"] == B.RANGE_CONSERVATIVE
    # unequal round counts cannot be paired: conservative
    assert B.ratio_spread([1.0, 2.0], [1.0])["range_from"] == B.RANGE_CONSERVATIVE


def test_goal_is_met_only_when_the_whole_range_meets_it():
    inside = {"median": 0.5, "min": 0.45, "max": 0.6}
    straddles = {"median": 0.55, "min": 0.5, "max": 0.61}
    above = {"median": 0.7, "min": 0.65, "max": 0.8}
    assert B.goal(inside, at_most=0.6)["met"] is True  # the bound itself counts
    g = B.goal(straddles, at_most=0.6)
    assert g["met"] is False and g["median_meets"] is True and g["range"] == [0.5, 0.61]
    g = B.goal(above, at_most=0.6)
    assert g["met"] is False and g["median_meets"] is False
    # at least: the lower end decides
    assert B.goal({"median": 3.0, "min": 2.0, "max": 4.0}, at_least=2.0)["met"] is True
    assert B.goal({"median": 3.0, "min": 1.9, "max": 4.0}, at_least=2.0)["met"] is False
    # both bounds
    assert B.goal({"median": 1.0, "min": 0.9, "max": 1.1}, at_least=0.8, at_most=1.2)["met"] is True
    assert B.goal({"median": 1.0, "min": 0.9, "max": 1.3}, at_least=0.8, at_most=1.2)["met"] is False
    # on a per-round ratio range from interleaved rounds
    ratio = B.ratio_spread([5.0, 5.5, 6.2], [10.0, 10.0, 10.0])
    assert ratio["median"] == 0.55 and B.goal(ratio, at_most=0.6)["met"] is False
    assert B.goal(ratio, at_most=0.6)["range_from"] == B.RANGE_PER_ROUND
    with pytest.raises(ValueError):
        B.goal(inside)


def test_json_protocol_and_format():
    clock, calls = FakeClock(), []
    res = B.interleaved_rounds(scripted(clock, DURATIONS, calls), rounds=5, clock=clock)
    js = res.to_json(scale=1000.0)
    assert js["configs"]["A"]["median"] == 3000.0 and js["configs"]["A"]["warmup"] == [9000.0]
    assert js["protocol"]["rounds"] == 5 and js["protocol"]["meets_protocol"] is True
    assert B.protocol(3, 1)["meets_protocol"] is False and B.protocol(5, 0)["meets_protocol"] is False
    assert B.fmt_spread(res.stats("A"), ".1f", "s") == "3.0 (1.0-5.0) s"
    assert B.spread([2.0, 1.0]) == {"median": 1.5, "min": 1.0, "max": 2.0, "rounds": [2.0, 1.0]}
    with pytest.raises(ValueError):
        B.spread([])
