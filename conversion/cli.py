"""`braid convert to-hf|from-hf` (routed here by launch/cli.py): run a conversion, print what was written."""
from __future__ import annotations

import argparse


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def run(args: argparse.Namespace) -> int:
    from conversion.hf import from_hf, to_hf
    if args.direction == "to-hf":
        s = to_hf(args.source, args.out_dir, step=args.step, dtype=args.dtype, fmt=args.fmt,
                  tokenizer=args.tokenizer, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        print(f"wrote {s['out_dir']} ({s['format']} format) from {s['checkpoint']} (step {s['step']})")
        print(f"  weights: {s['tensors']} tensors, {s['parameters']:,} parameters, {s['dtype']}, "
              f"{_size(s['bytes'])} in {len(s['weight_files'])} file(s)")
        print(f"  tokenizer: {s['tokenizer'] or 'none (the run names no tokenizer; pass --tokenizer)'}")
        others = [f for f in s["files"] if f not in s["weight_files"]]
        print(f"  files: {', '.join(others)}")
        loader = "AutoModelForCausalLM.from_pretrained(OUT_DIR" + (
            ", trust_remote_code=True)" if s["format"] == "braid" else ")")
        print(f"  load with: {loader}")
        for note in s["notes"]:
            print(f"  note: {note}")
        return 0
    s = from_hf(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
    print(f"wrote {s['checkpoint']} ({s['parameters']:,} parameters, split for tp={s['tp']}, pp={s['pp']})")
    print(f"  continue training: braid train CONFIG run_dir={s['out_dir']} parallel.tp={s['tp']} "
          f"parallel.pp={s['pp']}  (model: pattern {s['pattern']!r}; the config's model must match)")
    return 0
