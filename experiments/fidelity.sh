#!/usr/bin/env bash
# Issue 24: the host model's fidelity on a quiet host, in one command.
#   experiments/fidelity.sh [OUT] [--quick]      (run from the repository root)
# For 1 and 2 cores, and for the host's own disk and reads throttled to raspberry-pi-5-8gb:microsd:
# `moelab profile` twice (the two profiles' host figures are compared, to see how far they repeat),
# then `moelab validate` on the first, which prints the issue's table per format (signed median TPOT
# bias with its bootstrap CI, |error| median / max, the executor's spread, the share within its
# 2 sigma, Kendall tau, best within noise). Without --quick validate runs its reduced matrix
# (`--reduced`: bf16, mwq, zip with LRU and the papers' caches at half the experts' bytes, batch 1
# and 4, prefetch none / oracle: 20 configurations, 3+ executor runs each, the full trace); with
# --quick its small one (bf16 and zip, 16 configurations, a short trace). The profiles are full either
# way (about 10 minutes each on a 2-vCPU VM).
# Run it on a quiet host: `profile` and `validate` refuse a busy one (load >= half the cores).
set -euo pipefail
OUT=${1:-runs/fidelity}
QUICK=${2:-}
export PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$OUT"
moelab() { python -m experiments.cli "$@"; }
# profile and validate refuse a busy host, and each step's own work lifts the 1-minute load average
# for a while after it ends: wait (up to 3 minutes) for it to settle before the next step
quiet() {
  local half; half=$(( $(nproc) ))
  for _ in $(seq 36); do
    awk -v h="$half" '{ exit !($1 * 2 < h) }' /proc/loadavg && return 0
    sleep 5
  done
}
for cores in 1 2; do
  for throttle in none raspberry-pi-5-8gb:microsd; do
    tag="c$cores-${throttle%%:*}"
    flag=(); [ "$throttle" != none ] && flag=(--throttle "$throttle")
    for rep in a b; do            # a step whose output exists is done (rerun to resume)
      [ -s "$OUT/host-$tag-$rep.yaml" ] && continue
      quiet
      # always a full profile: a quick one's few samples move the predictions more than the model's
      # own error (experiments/validate.py QUICK_PROFILE); --quick only shrinks validate's matrix
      moelab profile --quiet --cores "$cores" "${flag[@]}" --out "$OUT/host-$tag-$rep.yaml"
    done
    grep -h -o "the lock estimate of .*" "$OUT/host-$tag-a.yaml" "$OUT/host-$tag-b.yaml" || true
    python - "$OUT/host-$tag-a.yaml" "$OUT/host-$tag-b.yaml" <<'PY'
import sys
from dataclasses import astuple
from devices.profile import load_device
a, b = (load_device(p).compute.measured.host for p in sys.argv[1:])
def flat(h):
    out = [s for k in sorted(h.calls) for row in h.calls[k] for s in row]
    out += list(h.dense_prefill) + list(h.dense_decode) + [h.decide] + [h.read[k] for k in sorted(h.read)]
    return out + [h.decompress[k][0] for k in sorted(h.decompress)]
d = [abs(x - y) for p, q in zip(flat(a), flat(b)) for x, y in zip(astuple(p), astuple(q))]
print(f"{sys.argv[1]} vs {sys.argv[2]}: host figures differ by median {sorted(d)[len(d) // 2]:.3f}, "
      f"max {max(d):.3f} (lock and cpu shares)")
def slows(h):       # the co-runs' slowdowns (compute.measured.host.beside), in one order
    out = []
    for kind in sorted(h.beside or {}):
        for name, f in sorted(h.beside[kind].items()):
            rows = [x for k in sorted(f.calls) for row in f.calls[k] for x in row]
            out += [v for x in rows + list(f.dense_prefill) + list(f.dense_decode) + [f.decide] for v in x]
    return out
r = sorted(abs(x / y - 1) for x, y in zip(slows(a), slows(b)))
if r:
    print(f"  co-run slowdowns differ by median {100 * r[len(r) // 2]:.0f}%, 90th percentile "
          f"{100 * r[int(0.9 * (len(r) - 1))]:.0f}% (relative)")
PY
    echo "== validate: $cores core(s), storage $throttle"
    quiet
    moelab validate --quiet --cores "$cores" "${flag[@]}" --profile "$OUT/host-$tag-a.yaml" \
      --out "$OUT/validate-$tag" ${QUICK:---reduced}
  done
done
