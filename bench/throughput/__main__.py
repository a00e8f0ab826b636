"""`python -m bench.throughput [options]`: the same as `python -m bench throughput [options]`."""

from __future__ import annotations

from bench.throughput.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
