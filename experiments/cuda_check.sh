#!/usr/bin/env bash
# Issue 24 item 4 (and issue 26 item 4: tiers and placement): the executor on CUDA, for a session
# with a GPU. At most 10 minutes (each step has its own limit; with their kill grace they add up to
# 595 s; a dry run on a loaded 2-vCPU host took 365 s before the tiers step was added). Run from the repository root, in a Python environment
# with the project installed (`python -m pip install -e ".[executor,test]"`) and a CUDA build of
# torch:
#
#   bash experiments/cuda_check.sh                 # writes runs/cuda-check/ (or $OUT/cuda-check)
#   DEVICE=cpu bash experiments/cuda_check.sh      # the same steps on CPU: a dry run of the script
#
# Steps, each timed, its exit status and last lines in summary.txt, its whole output in <step>.log:
#   env       torch, its CUDA build, the GPU's name
#   tests     the executor's tests (they run their CPU paths: the CPU path must pass everything)
#   execute   the executor on $DEVICE against CPU, per format (bf16, mwq, zip) on the model's own
#             recorded routing: identical decisions (both engines' decision sequences) and tokens,
#             the largest difference of the final logits, tokens/s of each
#   profile   `moelab profile --quick --torch-device $DEVICE` (--force: the machine is lent for
#             minutes, so it records the load it saw rather than waiting for a quiet host)
#   validate  a small `moelab validate --quick --torch-device $DEVICE` on that profile
#   tiers     tests/test_exec_tiers.py (its CUDA test: pinned host buffers, the copy stream, decisions
#             identical to the simulator's) and a small tiered `moelab execute --torch-device $DEVICE`
#             (host level, cpu-static placement, throttled like the RTX 3060 laptop's PCIe link)
# A step that fails does not stop the next ones; the script's exit status is the number of failed
# steps.
set -u
DEVICE=${DEVICE:-cuda}
DIR=${OUT:-runs}/cuda-check
PY=${PYTHON:-python}
mkdir -p "$DIR"
SUMMARY=$DIR/summary.txt
: >"$SUMMARY"
FAILED=0

step() {        # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$DIR/$name.log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    {
        echo "== $name: rc $rc in $((SECONDS - t0)) s (limit $limit s)"
        tail -n 15 "$DIR/$name.log"
        echo
    } >>"$SUMMARY"
}

step env 20 "$PY" -c "
import os, torch
print('torch', torch.__version__, 'cuda build', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(0), 'devices', torch.cuda.device_count())
print('cpus', os.cpu_count(), 'load', os.getloadavg())
if '$DEVICE' == 'cuda' and not torch.cuda.is_available():
    raise SystemExit('no CUDA device: nothing below measures a GPU (DEVICE=cpu for a dry run)')
"

step tests 80 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_executor.py tests/test_io.py tests/test_store.py \
    tests/test_mwq.py tests/test_zipcodec.py tests/test_cores.py

step execute 70 "$PY" - "$DEVICE" "$DIR" <<'EOF'
"""The executor on DEVICE against CPU, per format, on the model's own recorded routing."""
import sys
from pathlib import Path

import torch

from executor.record import record_routing
from executor.train import DEFAULT_MODEL, load_trained
from experiments.run_exec import HostOptions, execute
from experiments.spec import RunSpec

device, out = sys.argv[1], Path(sys.argv[2])
model, tok, _ = load_trained(DEFAULT_MODEL)
trace = record_routing(model, torch.randint(0, model.cfg.vocab, (2, 8)), 12, model_name=Path(DEFAULT_MODEL).name)
trace.save(out / "trace.npz")
failed = 0
for fmt in ("bf16", "mwq", "zip"):
    spec = RunSpec.from_doc({"trace": str(out / "trace.npz"), "format": fmt, "batch": 2,
                             "policy": {"cache": "lru", "prefetch": "oracle"}, "store": str(out / f"store-{fmt}")},
                            "cuda check")
    runs = {}
    for dev in ("cpu", device):
        runs[dev] = execute(spec, HostOptions(torch_device=dev), quiet=True)
    a, b = runs["cpu"], runs[device]
    same = a.timeline.decisions() == b.timeline.decisions()
    tokens = bool(torch.equal(a.run.tokens, b.run.tokens))
    failed += not same
    print(f"{fmt}: {device} decisions identical to cpu: {same}; tokens identical: {tokens}; "
          f"throughput cpu {a.metrics['throughput_tok_s']:.1f} tok/s, {device} {b.metrics['throughput_tok_s']:.1f} "
          f"tok/s; TPOT cpu {1e3 * a.metrics['tpot_s_mean']:.3f} ms, {device} {1e3 * b.metrics['tpot_s_mean']:.3f} ms")
sys.exit(failed)
EOF

step profile 240 "$PY" -m experiments.cli profile --quick --quiet --force --torch-device "$DEVICE" \
    --out "$DIR/host-$DEVICE.yaml"
if [ -f "$DIR/host-$DEVICE.yaml" ]; then
    { echo "== profile figures"; grep -E "^# cores|^  (memory_bandwidth|flops|overhead):" "$DIR/host-$DEVICE.yaml"
      sed -n '/^    experts:/,/^    step:/p; /^    contention:/,/^decompress:/p' "$DIR/host-$DEVICE.yaml"; echo; } >>"$SUMMARY"
    step validate 75 "$PY" -m experiments.cli validate --quick --quiet --force --torch-device "$DEVICE" --repeats 2 \
        --max-repeats 2 --profile "$DIR/host-$DEVICE.yaml" --out "$DIR/validate"
else                    # validate would measure a profile first: not in the time left
    FAILED=$((FAILED + 1))
    echo "== validate: skipped (no profile written)" >>"$SUMMARY"
fi
[ -f "$DIR/validate/validation.md" ] && { echo "== validation.md"; sed -n '1,/^## Every configuration/p' "$DIR/validate/validation.md"; } >>"$SUMMARY"

# the trace is the execute step's (2 requests, 8 prompt tokens, 12 new); a prefill layer needs up to 16
# experts (1.97 MB in bf16): 2.5 MB on the GPU, 4 MB in host RAM, the first two layers on the CPU
step tiers 60 bash -c '
    set -e
    "$1" -m pytest -q -x -p no:cacheprovider -rs tests/test_exec_tiers.py
    "$1" -m experiments.cli execute --torch-device "$2" --trace "$3/trace.npz" --batch 2 --format bf16 \
        --store "$3/store-bf16" --budget 2.5MB --host-budget 4MB --placement cpu-static --placement-option layers=2 \
        --throttle rtx-3060-laptop-6gb --quiet --out "$3/execute-tiers"
    "$1" -c "import json, sys; m = json.load(open(sys.argv[1])); print({k: m[k] for k in (\"cpu_token_share\",
        \"host_hit_ratio\", \"link_bytes\", \"link_busy_fraction\", \"cpu_busy_fraction\", \"host_pinned\",
        \"tpot_s_mean\", \"throughput_tok_s\")})" "$3/execute-tiers/metrics.json"
' tiers "$PY" "$DEVICE" "$DIR"

echo "failed steps: $FAILED (see $SUMMARY)" | tee -a "$SUMMARY"
exit "$FAILED"
