"""The schemathesis fuzz of tests/test_api_fuzz.py, for longer: every route, valid and invalid
requests, with and without a key, against the real service; prints what ran and how long.

    .venv/bin/python -m bench.bench_fuzz [--examples 300]
"""

import argparse
import os
import subprocess
import sys
import time

from bench.common import ROOT


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=300, help="examples per route and mode")
    args = parser.parse_args()
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_api_fuzz.py"],
        cwd=ROOT, env=dict(os.environ, FUZZ_EXAMPLES=str(args.examples)),
    )
    print(f"fuzz: {args.examples} examples per route and mode (x2: with and without a key), "
          f"{time.perf_counter() - start:.0f} s, exit code {result.returncode}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
