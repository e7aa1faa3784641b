"""The aha-moment report's reflection curve: its ends average a sixth of the run, so rare events read as a trend."""

from types import SimpleNamespace

from nanoseek.report import _reflection, curve_ends


def test_reflection_ends_average_a_sixth_of_the_run_not_five_noisy_steps():
    # 60 steps falling from 6% to 2%, with the first 5 low and the last 5 high by chance
    share = [0.02] * 5 + [0.08] * 5 + [0.06] * 20 + [0.03] * 20 + [0.005] * 5 + [0.04] * 5
    records = [{"reflection": s, "difficulty/2/reflection": s} for s in share]
    assert curve_ends(records, "reflection")[1] > curve_ends(records, "reflection")[0]  # 5 steps: "rose"
    before, after = SimpleNamespace(pass_at_1=0.5), SimpleNamespace(pass_at_1=0.9)
    reflection = _reflection(records, before, after, samples=[])
    assert reflection["window"] == 10
    ends = reflection["rl_curve"]["reflection"]
    assert abs(ends["first_steps"] - 0.05) < 1e-9 and abs(ends["last_steps"] - 0.0225) < 1e-9
    assert reflection["goals"]["reflection_rose"] is False
    # a short run keeps at least 5 steps a side, and no more than half of it
    assert _reflection(records[:12], before, after, samples=[])["window"] == 5
    assert _reflection(records[:6], before, after, samples=[])["window"] == 3
