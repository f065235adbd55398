"""What a run prints and writes: the summary table, a note when the budget explains a zero hit
ratio, and the run's files (metrics.json, timeline.json, gantt.png) written as one unit.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from devices.units import ConfigError, format_size

def report_rows(m: dict) -> list[tuple[str, str]]:
    """Rows for the policies' own counters (Policies.report)."""
    if "resident_first_asked" in m:
        return [("resident-first", f"{m['resident_first_substituted']} of {m['resident_first_asked']} expert "
                                   f"uses at a resident lower level ({m['resident_first_fraction']:.3f})")]
    return []

def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")

def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"

def _ratio(v) -> str:
    return "-" if v is None else f"{v:.3f}"

def summary_rows(m: dict) -> list[tuple[str, str]]:
    ttft = f"{_ms(m['ttft_s'])} ms (mean over {len(m['ttft_s_per_request'])} requests; cold start: " \
           f"{_ms(m['ttft_s_cold'])} ms)"
    rows = [
        ("TTFT", ttft),
        ("TPOT mean / p50 / p99", f"{_ms(m['tpot_s_mean'])} / {_ms(m['tpot_s_p50'])} / {_ms(m['tpot_s_p99'])} ms"),
        ("throughput", "-" if m["throughput_tok_s"] is None else
         f"{m['throughput_tok_s']:.2f} tok/s ({m['generated_tokens']} new tokens)"),
        ("peak expert memory", format_size(m["peak_expert_bytes"])),
        ("bytes read", format_size(m["bytes_read"])),
        ("hit ratio (demand)", _ratio(m["hit_ratio"])),
    ]
    if m["prefetches"]:
        rows.append(("prefetch coverage / waste", f"{_ratio(m['prefetch_coverage'])} of needed parts / "
                                                  f"{format_size(m['prefetch_waste_bytes'])} never used "
                                                  f"({m['prefetches']} prefetched loads)"))
    if m.get("bits_per_weight") is not None:
        rows.append(("precision", f"{m['bits_per_weight']:.2f} bits per weight (token-weighted)"))
    rows += [("compute bubble", _ratio(m["compute_bubble_fraction"])),
             ("I/O busy", _ratio(m["io_busy_fraction"]))]
    if "host_hit_ratio" in m:                  # a host level (timeline/tiers.py)
        rows.append(("host level", f"{m['host_cache']} over {format_size(m['host_budget_bytes'])}: hit ratio "
                                   f"{_ratio(m['host_hit_ratio'])}, peak {format_size(m['host_peak_bytes'])}"))
        rows += [(f"copies {r.removeprefix('link:')}", f"{format_size(b)}, busy {_ratio(m['link_busy_fraction'][r])}")
                 for r, b in m["link_bytes"].items()]
        rows.append(("CPU experts", f"{m['placement']}: {_ratio(m['cpu_token_share'])} of expert tokens, CPU busy "
                                    f"{_ratio(m['cpu_busy_fraction'])}"))
    if m.get("energy_per_token_j") is not None:
        rows.append(("energy", f"{m['energy_per_token_j']:.3g} J per token, {m['average_power_w']:.3g} W average "
                               f"({m['energy_j']:.4g} J{', mode ' + m['power_mode'] if m.get('power_mode') else ''})"))
    return rows

def hit_ratio_note(m: dict, timeline, budget: int, fmt) -> str | None:
    """Why a run hit nothing, when the budget is the reason."""
    if m["hit_ratio"] != 0 or not m["accesses"]:
        return None
    per_step: dict[int, set] = {}
    for e in timeline.events:
        if e.resource == "compute":
            per_step.setdefault(e.step, set()).add((e.layer, e.expert))
    need = min(map(len, per_step.values()))
    fit = budget // max(fmt.level_bytes(fmt.levels - 1), 1)
    if fit >= need:
        return "  note: hit ratio 0: no part was resident before its layer asked for it"
    return (f"  note: hit ratio 0: the budget holds {fit} experts, fewer than the {need} that even the smallest "
            f"step computes across its layers, so each expert is evicted before the next step asks for it "
            f"again; a larger --budget shows the policies apart")

def json_safe(value):
    """NaN / inf -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

def write_outputs(out: Path, timeline, metrics: dict, quiet: bool = False) -> None:
    """metrics.json, timeline.json and gantt.png as one unit: written into a temporary folder
    beside `out`, renamed into place; a previous run's folder is replaced only then."""
    from timeline.gantt import gantt
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        (tmp / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False) + "\n")
        with open(tmp / "timeline.json", "w") as f:
            json.dump(timeline.chrome_trace(), f)
        gantt(timeline, tmp / "gantt.png")
        os.chmod(tmp, 0o755)
        for _ in range(5):            # a concurrent run may put its folder there between our renames
            try:
                os.rename(tmp, out)
                break
            except OSError:
                if not out.exists():
                    raise
                old = old or Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
                os.rename(out, old / f"{len(list(old.iterdir()))}")
        else:
            raise ConfigError(f"--out {out}: other runs keep writing this folder; give another --out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    if not quiet:
        print(f"wrote {out / 'metrics.json'}, {out / 'timeline.json'} (Chrome trace: open in Perfetto), "
              f"{out / 'gantt.png'}")
