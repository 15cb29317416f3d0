"""Before/after: ``fastrms bench`` on two installs of fastrms, run alternately, in one run.

Each round runs ``python -m fastrms bench --json`` under the "before" interpreter and then the
"after" one (the order alternates round by round, so drift on a shared machine hits both), and
the report gives, for every cell (algorithm, size, variant) and model workload, the ratio of
the medians after/before in each round. A ratio near 1.0 in every round means the change left
the speed alone; the spread across rounds is the noise of the machine::

    python bench/before_after.py --before /work/old/.venv/bin/python \\
        --after .venv/bin/python --rounds 3 --json bench/results/before-after.json \\
        -- --algo rmsprop,adam,adagrad --sizes 1e5,1e7 --model mlp,gpt2-tiny

Everything after ``--`` goes to ``fastrms bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def bench_once(python: str, bench_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [python, "-m", "fastrms", "bench", "--json", path, *bench_args]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)


def cells(result: dict) -> dict[str, float]:
    """Median seconds of every single-array cell and every model-workload variant."""
    out = {f"{c['algo']} n={c['n']} {c['variant']}": c["median_s"] for c in result["cells"]}
    for m in result.get("models", []):
        for c in m["cells"]:
            out[f"{m['model']}/{m['algo']} {c['variant']}"] = c["median_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="python of the old install")
    parser.add_argument("--after", required=True, help="python of the new install")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the ratios here")
    parser.add_argument("bench_args", nargs="*", help="arguments for fastrms bench (after --)")
    args = parser.parse_args()

    ratios: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        medians = {}
        for which in order:
            print(f"round {r + 1}/{args.rounds}: {which}", file=sys.stderr, flush=True)
            medians[which] = cells(bench_once(getattr(args, which), args.bench_args))
        for key in medians["before"].keys() & medians["after"].keys():
            ratios.setdefault(key, []).append(medians["after"][key] / medians["before"][key])

    fastrms_rows = {k: v for k, v in sorted(ratios.items()) if " cpu" in k or " numpy" in k}
    print("| cell | after/before time, per round | median |")
    print("|---|---|---|")
    for key, values in fastrms_rows.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {key} | {shown} | {statistics.median(values):.2f} |")
    all_fastrms = [statistics.median(v) for v in fastrms_rows.values()]
    print(
        f"\nfastrms cells: median of medians {statistics.median(all_fastrms):.3f}, "
        f"range {min(all_fastrms):.2f}-{max(all_fastrms):.2f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench_args": args.bench_args, "rounds": args.rounds,
                       "after_over_before": ratios}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
