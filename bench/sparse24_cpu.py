"""CPU 2:4 linear benchmark (the same as `semisparse bench`): dense F.linear, torch CSR
(50% unstructured) and semisparse, measured side by side in one run.

    python bench/sparse24_cpu.py                 # the full table (docs/BENCHMARKS.md)
    python bench/sparse24_cpu.py --quick         # one small shape, few repeats
"""

from semisparse.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
