"""`moelab train`, `store build`, `eval`, `train-bit-router`: the executor's models and stores.
"""
from __future__ import annotations

import json
from pathlib import Path

from devices.units import format_size
from experiments.cli.args import (add_format_args, add_model_args, check_out_dir, check_out_file,
                                      positive_float, positive_int)

def cmd_train(args) -> None:
    from executor.train import train
    check_out_dir(args.out, run_files=None)       # before training, so a trained model is never lost
    log = train(args.out, minutes=args.minutes, seed=args.seed, quiet=args.quiet)
    print(json.dumps({k: v for k, v in log.items() if k not in ("history", "losses")}, indent=1, default=str))

def cmd_store_build(args) -> None:
    """Build the store, or check every blob of an existing one and rewrite the bad ones."""
    from experiments.run import default_store
    from workloads.formats import FormatSpec
    fmt = FormatSpec(args.format or "bf16", ladder=args.ladder, codec=args.codec)
    name = Path(args.hf).name if args.hf else Path(args.model_dir or "tiny-moe").name
    folder = Path(args.store) if args.store else default_store(name, fmt.name)
    if args.hf:          # expert by expert: memory is the dense weights plus about one expert
        from executor.hf_checkpoint import build_hf_store
        _, store = build_hf_store(args.hf, folder, fmt.name, quiet=args.quiet, verify=True, **fmt.options())
    else:
        from executor.store_build import ensure_store
        from experiments.run_exec import HostOptions, load_model
        from experiments.spec import RunSpec
        model, _, name = load_model(RunSpec(model=args.model_dir), HostOptions())
        store = ensure_store(model, folder, fmt.name, quiet=args.quiet, verify=True, **fmt.options())
    fmt, info = store.format, store.build_info or {}
    action = info.get("action", "reused")
    detail = {"built": f" in {info.get('seconds', 0):.1f} s", "rebuilt": f" ({info.get('reason')})",
              "repaired": f": rewrote {len(info.get('repaired', []))} bad blobs"}.get(action, "")
    peak = f", peak RSS {format_size(info['peak_rss_bytes'])}" if "peak_rss_bytes" in info else ""
    print(f"store {store.path}: {action}{detail}{peak}; {fmt.name}, {len(store.keys())} blobs, "
          f"{format_size(fmt.expert_bytes)} per expert ({fmt.n_parts} parts)")


def cmd_eval(args) -> None:
    from executor.evaluate import run_eval
    check_out_dir(args.out, run_files=None)
    run_eval(args.model_dir, args.out, windows=args.windows, ladders=args.ladders or ("v1", "v2"),
             base_fit=args.base_fit, bit_routers=args.bit_router, quiet=args.quiet)

def cmd_train_bit_router(args) -> None:
    from executor.bit_router import default_path, save_bit_router, train_bit_router
    from executor.train import DEFAULT_MODEL, load_trained
    out = Path(args.out) if args.out else default_path(args.model_dir or DEFAULT_MODEL, args.ladder)
    check_out_file(str(out))
    model, _, _ = load_trained(args.model_dir)
    router = train_bit_router(model, args.ladder, minutes=args.minutes, steps=args.steps, alpha=args.alpha,
                              base_fit=args.base_fit, seed=args.seed, quiet=args.quiet)
    save_bit_router(router, out)
    m = router.meta
    print(f"wrote {out}: ladder {m['ladder']}, {m['steps']} steps in {m['train_seconds']} s, KL {m['final_kl_ema']}, "
          f"level fractions {m['calibration']['level_fractions']} (capacities {m['capacities']})")


def add_parsers(sub, add) -> None:
    p = add(sub, "train", help="train the small MoE LM on the Python standard library's sources")
    p.add_argument("--out", required=True, help="model folder to write (checked writable before training)")
    p.add_argument("--minutes", type=positive_float, default=15.0, help="training time in minutes")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    p.set_defaults(func=cmd_train)

    sp = add(sub, "store", help="expert stores").add_subparsers(dest="store_cmd", required=True)
    p = add(sp, "build", help="write a model's experts as an on-disk store (resumable)")
    add_model_args(p)
    add_format_args(p)
    p.add_argument("--store", "--out", dest="store", help="store folder (default: runs/stores/MODEL-FORMAT)")
    p.set_defaults(func=cmd_store_build)
    p = add(sub, "eval", help="held-out perplexity of the trained model at every expert precision (D²MoE Table 3)")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--windows", type=positive_int, default=128, help="held-out windows (256 bytes each)")
    p.add_argument("--ladder", dest="ladders", action="append", choices=["v1", "v2"],
                   help="MWQ ladder (repeatable; default: v1 and v2)")
    p.add_argument("--base-fit", choices=["topgrid", "own"],
                   help="MWQ base fit of the allocator rows (default: the quantizer's; the level rows show both)")
    p.add_argument("--bit-router", action="append", default=[], metavar="PATH",
                   help="bit router for the learned rows (repeatable; default: bit_router-LADDER.safetensors "
                        "beside the model)")
    p.add_argument("--out", default="runs/eval", help="folder for eval.csv and eval.md")
    p.set_defaults(func=cmd_eval)

    p = add(sub, "train-bit-router", help="train D²MoE's bit-width router on the trained model")
    p.add_argument("--model-dir", help="a folder written by `moelab train` (default: the bundled tiny-moe)")
    p.add_argument("--ladder", default="v1", choices=["v1", "v2"], help="MWQ ladder whose levels it chooses")
    p.add_argument("--minutes", type=positive_float, default=15.0, help="training time in minutes")
    p.add_argument("--steps", type=positive_int, help="train this many steps instead of --minutes")
    p.add_argument("--alpha", type=float, default=1e-4, help="weight of the expected-bits term of the loss (per bit)")
    p.add_argument("--base-fit", choices=["topgrid", "own"], help="MWQ base fit (default: the quantizer's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="file to write (default: bit_router-LADDER.safetensors beside the model)")
    p.set_defaults(func=cmd_train_bit_router)
