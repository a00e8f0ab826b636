"""`python -m bench NAME [options]`: run the benchmark `bench/NAME[.py]` (`--help` on each)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "throughput": "bench.throughput",
    "producer": "bench.producer",
    "real-dataset": "bench.real_dataset",
    "precision": "bench.precision",
    "decode_memory": "bench.decode_memory",
    "review_loop": "bench.review_loop",
    "ledger_scale": "bench.ledger_scale",
    "concurrency": "bench.concurrency",
    "calibration": "bench.calibration",
    "ledger_floor": "bench.ledger_floor",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in BENCHMARKS:
        print(f"usage: python -m bench {{{','.join(BENCHMARKS)}}} [options]  (--help on each)")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(BENCHMARKS[name])
    # Each benchmark parses sys.argv itself; show it its own name and options only.
    sys.argv = [f"python -m bench {name}", *rest]
    status = module.main()
    return int(status or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
