"""Print two ``--metrics-file`` loss curves side by side with their largest difference.

    python examples/compare_runs.py single.jsonl helix.jsonl [--max-rel-diff 1e-4]

Exits non-zero if the curves differ in length or by more than ``--max-rel-diff``.
"""

import argparse
import json
import sys


def _losses(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("candidate")
    parser.add_argument("--max-rel-diff", type=float, default=1e-4)
    args = parser.parse_args()
    ref, cand = _losses(args.reference), _losses(args.candidate)
    if len(ref) != len(cand) or not ref:
        print(f"curves differ in length: {len(ref)} vs {len(cand)}")
        return 1
    print(f"{'iter':>5} {'reference':>12} {'candidate':>12} {'rel diff':>10}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(ref, cand), start=1):
        rel = abs(a - b) / abs(a)
        worst = max(worst, rel)
        print(f"{i:5d} {a:12.6f} {b:12.6f} {rel:10.2e}")
    verdict = "MATCH" if worst <= args.max_rel_diff else "MISMATCH"
    print(f"largest relative difference {worst:.2e} (limit {args.max_rel_diff:.0e}): {verdict}")
    print(f"loss fell from {ref[0]:.4f} to {ref[-1]:.4f}")
    return 0 if verdict == "MATCH" else 1


if __name__ == "__main__":
    sys.exit(main())
