"""Metrics on hand-built timelines: demand hits vs prefetch coverage and waste, TTFT per
request, no NaN, and the Gantt chart's summary of a long run."""
import json
import math

import numpy as np
import pytest

from timeline.metrics import compute_metrics
from timeline.events import Event, Timeline

B = 10     # bytes of one (single-part) expert


def cache(kind, step, layer, expert):
    return Event("cache", kind, 0.0, 0.0, layer, expert, 0, B, step)


def compute(step, layer, expert, start, end, tokens=1, level=0):
    return Event("compute", "expert", start, end, layer, expert, level, B, step, tokens)


def meta(groups):
    """groups: requests per group, one step each, plus extra decode steps in group 0."""
    return {"level_parts": [[0]], "steps": groups}


def test_prefetch_for_the_point_that_uses_it_is_coverage_not_a_hit():
    events = [
        # step 0, layer 0: E0 admitted; prefetches for (0, 1): E1 (not needed there) and E5 (never needed)
        cache("admit", 0, 0, 0), compute(0, 0, 0, 0.0, 1.0), cache("prefetch", 0, 1, 1), cache("prefetch", 0, 1, 5),
        # step 0, layer 1: E2 admitted
        cache("admit", 0, 1, 2), compute(0, 1, 2, 1.0, 2.0),
        # step 1: layer 0 E0 resident (hit); layer 1 E1 resident since its earlier prefetch (hit, not coverage);
        # layer 1 prefetches E3 for (step 2, layer 0), which is evicted before it is used
        compute(1, 0, 0, 2.0, 2.5), compute(1, 1, 1, 2.5, 3.0), cache("prefetch", 1, 0, 3), cache("evict", 1, 0, 3),
        # step 2, layer 0: E3 must be loaded again; prefetch of E4 for (2, 1) is used there
        cache("admit", 2, 0, 3), compute(2, 0, 3, 5.0, 6.0), cache("prefetch", 2, 1, 4), compute(2, 1, 4, 6.0, 6.5),
    ]
    steps = [{"step": 0, "group": 0, "prefill": True, "tokens": 1, "new_tokens": 1},
             {"step": 1, "group": 0, "prefill": False, "tokens": 1, "new_tokens": 1},
             {"step": 2, "group": 1, "prefill": True, "tokens": 2, "new_tokens": 2}]
    m = compute_metrics(Timeline(events, meta(steps)), level_bits=[4])
    assert m["accesses"] == 6 and m["admits"] == 3 and m["prefetches"] == 4
    assert m["hit_ratio"] == pytest.approx(2 / 6)             # (1, 0, E0) and (1, 1, E1)
    assert m["prefetch_coverage"] == pytest.approx(1 / 6)     # (2, 1, E4)
    assert m["prefetch_waste_bytes"] == 2 * B                 # E5 never needed, E3 evicted unused
    # TTFT: group 0 (1 request, cold) 2.0 s, group 1 (2 requests, warm) 1.5 s
    assert m["ttft_s_per_request"] == [2.0, 1.5, 1.5]
    assert m["ttft_s"] == pytest.approx(5 / 3) and m["ttft_s_cold"] == 2.0 and m["ttft_s_warm"] == 1.5
    assert m["tpot_s_mean"] == pytest.approx(1.0) and m["generated_tokens"] == 4
    assert m["bits_per_weight"] == 4


def test_a_part_prefetched_by_the_last_layer_is_for_the_next_step():
    # 2 layers; layer 1 of step 0 prefetches E7 of layer 0, used at step 1, layer 0
    events = [cache("admit", 0, 0, 0), compute(0, 0, 0, 0, 1), cache("admit", 0, 1, 1), compute(0, 1, 1, 1, 2),
              cache("prefetch", 0, 0, 7), compute(1, 0, 7, 2, 3), compute(1, 1, 1, 3, 4)]
    steps = [{"step": i, "group": 0, "prefill": i == 0, "tokens": 1, "new_tokens": 1} for i in range(2)]
    m = compute_metrics(Timeline(events, meta(steps)))
    assert (m["accesses"], m["admits"]) == (4, 2)
    assert m["prefetch_coverage"] == pytest.approx(0.25) and m["hit_ratio"] == pytest.approx(0.25)
    assert m["prefetch_waste_bytes"] == 0 and m["bits_per_weight"] is None


def test_bits_per_weight_is_token_weighted():
    events = [cache("admit", 0, 0, 0), compute(0, 0, 0, 0, 1, tokens=3, level=0),
              compute(0, 0, 0, 1, 2, tokens=1, level=2)]
    steps = [{"step": 0, "group": 0, "prefill": True, "tokens": 4, "new_tokens": 1}]
    m = compute_metrics(Timeline(events, {"level_parts": [[0], [0, 1], [0, 1, 2]], "steps": steps}),
                        level_bits=[2, 3, 4])
    assert m["bits_per_weight"] == pytest.approx((3 * 2 + 1 * 4) / 4)
    assert m["accesses"] == 3                                  # the union of the levels' parts


def test_empty_run_has_no_nan():
    m = compute_metrics(Timeline([], {"level_parts": [[0]], "steps": []}))
    text = json.dumps(m, allow_nan=False)                     # raises on NaN / inf
    assert m["ttft_s"] is None and m["hit_ratio"] is None and m["throughput_tok_s"] is None
    assert "NaN" not in text


def test_busy_share_per_bin():
    from timeline.gantt import busy_share
    edges = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    share = busy_share(np.array([0.5, 1.0, 3.0]), np.array([1.5, 1.25, 3.5]), edges)
    assert share.tolist() == pytest.approx([0.5, 0.75, 0.0, 0.5])


def test_gantt_of_a_long_run_keeps_every_event(tmp_path, monkeypatch):
    # 30,000 loads over 3,000 steps: the old chart drew the first 20,000 and stopped
    events = [Event("io", "load", i * 1e-3, (i + 1) * 1e-3, 0, i % 8, 0, B, i // 10) for i in range(30000)]
    events += [Event("compute", "expert", (i + 1) * 1e-2 - 1e-4, (i + 1) * 1e-2, 0, 0, 0, B, i, 1)
               for i in range(3000)]
    seen = {}
    import timeline.gantt as plot
    from timeline.gantt import gantt
    real = plot.busy_share

    def spy(starts, ends, edges):
        seen[len(starts)] = float(edges[-1])
        return real(starts, ends, edges)
    monkeypatch.setattr(plot, "busy_share", spy)
    path = gantt(Timeline(events, {"steps": [{"step": i} for i in range(3000)]}), tmp_path / "g.png")
    assert path.stat().st_size > 1000
    assert seen == {30000: pytest.approx(30.0), 3000: pytest.approx(30.0)}   # the summary spans the whole run
    assert math.isclose(max(e.end for e in events), 30.0)
