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
        # Run outside any checkout: from a project root, ``-m fastrms`` would import that
        # root's fastrms rather than the interpreter's install.
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=tmp)
        with open(path) as f:
            return json.load(f)


def cells(result: dict, stat: str = "median") -> dict[str, tuple[float, float | None]]:
    """Seconds per step of every single-array cell and every model-workload variant (the
    median repetition, or with ``stat="best"`` the fastest), with its speed-up over torch
    measured in the same process (None without torch; always the medians' ratio)."""
    key_s = f"{stat}_s"
    out = {}
    for c in result["cells"]:
        out[f"{c['algo']} n={c['n']} {c['variant']}"] = (c[key_s], c.get("speedup_torch"))
    for m in result.get("models", []):
        for c in m["cells"]:
            key = f"{m['model']}/{m['algo']} {c['variant']}"
            out[key] = (c[key_s], c.get("speedup_torch"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="python of the old install")
    parser.add_argument("--after", required=True, help="python of the new install")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--labels", default="before,after", help="what the two installs are")
    parser.add_argument("--json", help="write the ratios here")
    parser.add_argument(
        "--stat",
        choices=("median", "best"),
        default="median",
        help="compare each cell's median repetition (default) or its fastest: on a shared "
        "machine other processes only ever add time, so the fastest is the steadier figure",
    )
    parser.add_argument("bench_args", nargs="*", help="arguments for fastrms bench (after --)")
    args = parser.parse_args()

    ratios: dict[str, list[float]] = {}
    # The same ratio with each run's time divided by torch's in that run: drift of the
    # machine between the two processes cancels.
    normalized: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        medians = {}
        for which in order:
            print(f"round {r + 1}/{args.rounds}: {which}", file=sys.stderr, flush=True)
            medians[which] = cells(bench_once(getattr(args, which), args.bench_args), args.stat)
        for key in medians["before"].keys() & medians["after"].keys():
            (t_before, vs_before), (t_after, vs_after) = (
                medians["before"][key],
                medians["after"][key],
            )
            ratios.setdefault(key, []).append(t_after / t_before)
            if vs_before and vs_after:
                normalized.setdefault(key, []).append(vs_before / vs_after)

    fastrms_rows = {k: v for k, v in sorted(ratios.items()) if " cpu" in k or " numpy" in k}
    print("| cell | after/before time, per round | median | same, relative to torch |")
    print("|---|---|---|---|")
    for key, values in fastrms_rows.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        rel = normalized.get(key)
        rel_shown = f"{statistics.median(rel):.2f} ({min(rel):.2f}-{max(rel):.2f})" if rel else "-"
        print(f"| {key} | {shown} | {statistics.median(values):.2f} | {rel_shown} |")
    all_fastrms = [statistics.median(v) for v in fastrms_rows.values()]
    print(
        f"\nfastrms cells: median of medians {statistics.median(all_fastrms):.3f}, "
        f"range {min(all_fastrms):.2f}-{max(all_fastrms):.2f}"
    )
    rel_all = [statistics.median(normalized[k]) for k in fastrms_rows if k in normalized]
    if rel_all:
        print(
            f"relative to torch: median of medians {statistics.median(rel_all):.3f}, "
            f"range {min(rel_all):.2f}-{max(rel_all):.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"labels": args.labels, "bench_args": args.bench_args, "rounds": args.rounds,
                       "stat": args.stat,
                       "after_over_before": ratios,
                       "after_over_before_relative_to_torch": normalized}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
