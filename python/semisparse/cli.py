"""The ``semisparse`` command."""

from __future__ import annotations

import argparse
import json
import sys

import torch

__all__ = ["main"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cmd_info(a) -> int:
    from .info import format_info, info

    d = info()
    print(json.dumps(d, indent=2) if a.json else format_info(d))
    return 0


def _cmd_demo(a) -> int:
    from .demo import run_demo

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        tokens = tuple(int(t) for t in a.tokens.split(","))
    except ValueError:
        print(f"semisparse demo: --tokens expects comma-separated integers, got {a.tokens!r}", file=sys.stderr)
        return 2
    if any(t < 1 for t in tokens):
        print(f"semisparse demo: --tokens must be positive, got {a.tokens!r}", file=sys.stderr)
        return 2
    for name, v, mult in (("--hidden", a.hidden, 4), ("--ffn", a.ffn, 4)):
        if v < 4 or v % mult:
            print(f"semisparse demo: {name} must be a positive multiple of {mult}, got {v}", file=sys.stderr)
            return 2
    if a.hidden % a.heads:
        print(f"semisparse demo: --hidden ({a.hidden}) must be divisible by --heads ({a.heads})", file=sys.stderr)
        return 2
    run_demo(d=a.hidden, f=a.ffn, layers=a.layers, heads=a.heads, tokens=tokens, dtype=_DTYPES[a.dtype], reps=a.reps, seed=a.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semisparse", description="Semi-structured sparsity for PyTorch transformers.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="native libraries, CPU SIMD path, CUDA kernels and why not")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("demo", help="make a built-in decoder 2:4 sparse and time it against dense")
    s.add_argument("--hidden", type=int, default=1024)
    s.add_argument("--ffn", type=int, default=2816)
    s.add_argument("--layers", type=int, default=4)
    s.add_argument("--heads", type=int, default=16)
    s.add_argument("--tokens", default="1,64", help="comma-separated prefill lengths to time")
    s.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    raise SystemExit(main())
