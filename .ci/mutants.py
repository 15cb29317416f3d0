#!/usr/bin/env python3
"""Seeded mutation check: do the tests fail when the library is wrong?

Each mutant is a small, deliberate bug (an operator swapped, a constant changed, a check or a
statement deleted, a comparison flipped) applied to a fresh copy of the tree. The relevant test
files then run against the copy (``pytest -x -q``, with a timeout); a mutant is *killed* if
they fail (or time out), and *survives* if they pass. A surviving mutant is a promise no test
holds the library to.

The mutants of the files named in :data:`MUTANTS` are a fixed, listed set, each one or more
``(original snippet, mutated snippet)`` edits of that file; any other file gets
``--per-file`` mutants generated deterministically from its syntax tree (seeded by ``--seed``).
Every mutant runs in a copy of the tree whose ``fastrms.kernels`` package is the copy's
``kernels/`` (not the installed one); a mutant of ``kernels/*`` gets a fresh
``NUMBA_CACHE_DIR`` (nothing compiled from the original may be reused), the others share one
warmed by the unmutated run, which must pass first.

Usage (from the repository root, with the project's virtualenv)::

    .venv/bin/python .ci/mutants.py                          # the default files and tests
    .venv/bin/python .ci/mutants.py fastrms/torch.py --tests tests/test_torch_optim.py
    .venv/bin/python .ci/mutants.py fastrms/specs_adam.py --tests-rev 569a385 --json before.json
    .venv/bin/python .ci/mutants.py --list                   # print the mutants, run nothing

``--tests-rev REV`` runs the tests of another commit (``git archive``) against the current
library: the kill rate of older tests. The MPI tests need ``OMPI_ALLOW_RUN_AS_ROOT=1`` and
``OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`` when run as root (as .ci/run exports them); a mutant
whose tests skipped is marked so in the output, as its survival may mean nothing.
CI does not run this script: a full run takes about half an hour on 2 cores.
"""

# ruff: noqa: E501  (the table of mutants keeps each snippet whole on its line)
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    """One bug: ``edits`` of ``file``, each an original snippet (found exactly once in the
    file as the edits before it left it) and its replacement."""

    file: str
    name: str
    edits: list[tuple[str, str]]


@dataclass
class Result:
    file: str
    name: str
    outcome: str  # killed, survived, timeout, error
    seconds: float
    skipped: int = 0
    detail: str = ""
    tests: list[str] = field(default_factory=list)


def m(file: str, name: str, *edits: tuple[str, str]) -> Mutant:
    return Mutant(file, name, list(edits))


SPECS_ADAM, SPECS_SGD, SPEC_TYPES, GROUPED, GROUPS, SCHEDULE, DIST, PART, CKPT, RULES = (
    "fastrms/specs_adam.py", "fastrms/specs_sgd.py", "fastrms/spec_types.py", "fastrms/grouped.py",
    "fastrms/launch_groups.py", "fastrms/schedule.py", "fastrms/distributed.py",
    "fastrms/shard_partition.py", "fastrms/shard_checkpoint.py", "kernels/rules.py",
)  # fmt: skip

#: The listed mutants. The first of grouped.py, distributed.py and specs.py are the three the
#: project's issue 22 found unguarded (each dtype group cast and checked just before it runs;
#: gradients summed instead of averaged; a changed Adam bias correction).
MUTANTS: dict[str, list[Mutant]] = {
    SPEC_TYPES: [
        m(SPEC_TYPES, "float32 fit check deleted",
          ("    eps = layout.eps_index\n    if (", "    return\n    eps = layout.eps_index\n    if (")),
        m(SPEC_TYPES, "eps underflow to float32 0 not refused",
          ("and (eps is None or not 0 < scalars[eps] < F32_TINY)", "and True")),
        m(SPEC_TYPES, "maximize ignored", ("return -1.0 if maximize else 1.0", "return 1.0")),
    ],
    SPECS_ADAM: [
        m(SPECS_ADAM, "Adam bias correction 1 - beta1**(step + 1)",
          ("step_size=lr / (1 - beta1**step),", "step_size=lr / (1 - beta1 ** (step + 1)),")),
        m(SPECS_ADAM, "Adam second bias correction of step + 1",
          ("1 / math.sqrt(1 - beta2**step)", "1 / math.sqrt(1 - beta2 ** (step + 1))")),
        m(SPECS_ADAM, "AdamW keeps the L2 term too",
          ("weight_decay=0.0 if decoupled_weight_decay else weight_decay,",
           "weight_decay=weight_decay,")),
    ],
    SPECS_SGD: [
        m(SPECS_SGD, "AdaGrad decays lr by step, not step - 1",
          ("clr = lr / (1 + (step - 1) * lr_decay)", "clr = lr / (1 + step * lr_decay)")),
        m(SPECS_SGD, "SGD's first step is step 0", ("first = step == 1", "first = step == 0")),
        m(SPECS_SGD, "SGD grad_scale dampening for 1 - dampening",
          ("grad_scale=1.0 if first else 1 - dampening", "grad_scale=1.0 if first else dampening")),
        m(SPECS_SGD, "RMSProp one_minus_alpha = alpha",
          ("one_minus_alpha=1 - alpha, eps=eps", "one_minus_alpha=alpha, eps=eps")),
        m(SPECS_SGD, "Lion decay 1 + lr * weight_decay",
          ("        decay=1 - lr * weight_decay, sign=maximize_sign(maximize),\n    )  # fmt: skip\n"
           "    return scalars, {}, (\"exp_avg\",)",
           "        decay=1 + lr * weight_decay, sign=maximize_sign(maximize),\n    )  # fmt: skip\n"
           "    return scalars, {}, (\"exp_avg\",)")),
        m(SPECS_SGD, "Nesterov with dampening accepted",
          ("if nesterov and (momentum == 0 or dampening != 0):", "if nesterov and momentum == 0:")),
        m(SPECS_SGD, "RMSProp momentum buffer at momentum 0",
          ("    use_momentum = momentum > 0\n    scalars = dict(\n        lr=lr, alpha=alpha,",
           "    use_momentum = momentum >= 0\n    scalars = dict(\n        lr=lr, alpha=alpha,")),
        m(SPECS_SGD, "AdaGrad default eps 1e-9",
          ('Option("eps", 1e-10, hyper.positive)', 'Option("eps", 1e-9, hyper.positive)')),
    ],
    GROUPED: [
        m(GROUPED, "each dtype group cast and checked just before it runs",
          ("        return [g.cast(setup) for g in self.groups]\n",
           "        return [setup] * len(self.groups)\n"),
          ("            group.launch(hyper, grads)\n\n    def run_addresses",
           "            group.launch(group.cast(hyper), grads)\n\n    def run_addresses")),
        m(GROUPED, "run_addresses casts each group just before it runs",
          ("        hypers = [group.cast(setup) for group in self.groups]",
           "        hypers = [setup] * len(self.groups)"),
          ("            group.launch(hyper, grads)\n\n    def _check_grads",
           "            group.launch(group.cast(hyper), grads)\n\n    def _check_grads")),
        m(GROUPED, "new gradients unchecked after the first step",
          ("if last is None or not all(map(operator.is_, grads, last)):", "if last is None:")),
        m(GROUPED, "a gradient overlapping a written array not refused",
          ("            if hit is not None:\n                self._refuse_overlap(mine[hit[0]], hit[1])",
           "            if hit is not None:\n                pass")),
        m(GROUPED, "written arrays may overlap each other",
          ("        check_no_overlap(written)\n", "")),
        m(GROUPED, "a replaced state array reuses the plan",
          ("            if not all(map(operator.is_, current, arrays)):\n                return False",
           "            if not all(map(operator.is_, current, arrays)):\n                pass")),
        m(GROUPED, "quick gradient check skips the shape",
          ("            and g.shape == shapes[i]\n", "")),
        m(GROUPED, "grads count not checked",
          ('        if len(grads) != len(self._params):\n            raise ValueError(f"grads has',
           '        if False:\n            raise ValueError(f"grads has')),
    ],
    GROUPS: [
        m(GROUPS, "stale scalars: cast once, never again",
          ("if setup.scalars != self._cast_of:", "if self._cast_of is None:")),
        m(GROUPS, "any group's rows taken as consecutive",
          ("consecutive = rows == list(range(rows[0], rows[0] + len(rows))) if rows else False",
           "consecutive = bool(rows)")),
        m(GROUPS, "table holds one element fewer", ("table[r, 0] = _size(p)", "table[r, 0] = _size(p) - 1")),
    ],
    SCHEDULE: [
        m(SCHEDULE, "schedule loses the last part",
          ("bounds = (np.arange(parts + 1, dtype=np.int64) * total) // parts",
           "bounds = (np.arange(parts + 1, dtype=np.int64) * total) // (parts + 1)")),
    ],
    DIST: [
        m(DIST, "gradients summed instead of averaged",
          ("if self.average and self.size > 1:", "if False:")),
        m(DIST, "the local step checked only after the reduction",
          ("take_local_step = self._inner._checked_step(self._grad_shard)",
           "take_local_step = lambda: self._inner.step(self._grad_shard)  # noqa: E731")),
        m(DIST, "gradient overlaps not refused",
          ("        self._refuse_overlaps(arrays)\n        return arrays", "        return arrays")),
        m(DIST, "ranks' signatures not compared",
          ("if not flags[0] and flags[1] == -flags[2]:", "if not flags[0]:")),
        m(DIST, "gradient shapes not compared",
          ("            if gi.shape != pi.shape:\n", "            if False:\n")),
        m(DIST, "own pieces not copied into the gathered buffer",
          ("            for dst, src in zip(g.mine_in_gathered, g.mine):\n                mem.copy(dst, src)",
           "            for dst, src in zip(g.mine_in_gathered, g.mine):\n                pass")),
        m(DIST, "float32 sent as MPI DOUBLE",
          ("return self._MPI.FLOAT if dtype == np.float32 else self._MPI.DOUBLE",
           "return self._MPI.DOUBLE")),
        m(DIST, "reduce='reduce' takes the maximum",
          ("op=MPI.SUM, root=r)", "op=MPI.MAX, root=r)")),
        m(DIST, "a failed construction check not shared",
          ('        self._agree(error, repr(signature), "params, optimizer and options")\n',
           "")),
    ],
    CKPT: [
        m(CKPT, "state_dict(root=r) delivered to the wrong ranks",
          ("receive = root is None or root == self.rank", "receive = root is None or root != self.rank")),
    ],
    PART: [
        m(PART, "pieces end one element early",
          ("a, z = max(lo, starts[i]), min(hi, starts[i] + n)",
           "a, z = max(lo, starts[i]), min(hi, starts[i] + n - 1)")),
        m(PART, "uneven bounds", ("return [total * r // nranks for r in range(nranks + 1)]",
                                  "return [-(-total * r // nranks) for r in range(nranks + 1)]")),
    ],
    RULES: [
        m(RULES, "RMSProp square_avg adds g, not g*g",
          ("v = alpha * square_avg[i] + one_minus_alpha * g * g",
           "v = alpha * square_avg[i] + one_minus_alpha * g")),
        m(RULES, "RMSProp eps_in_sqrt puts eps outside", ("d = math.sqrt(v + eps)", "d = math.sqrt(v) + eps")),
        m(RULES, "centered RMSProp adds m^2", ("v = v - m * m", "v = v + m * m")),
        m(RULES, "RMSProp momentum multiplies by d",
          ("b = momentum * momentum_buffer[i] + g / d", "b = momentum * momentum_buffer[i] + g * d")),
        m(RULES, "AdaGrad sums g, not g*g", ("s = state_sum[i] + g * g", "s = state_sum[i] + g")),
        m(RULES, "AdaGrad eps_in_sqrt puts eps outside", ("d = math.sqrt(s + eps)", "d = math.sqrt(s) + eps")),
        m(RULES, "AMSGrad keeps the minimum", ("if v != v or vmax < v:", "if v != v or vmax > v:")),
        m(RULES, "Adam L2 term uses the undecayed gradient sign",
          ("    amsgrad = flags[0]\n    p = decay * param[i]\n    g = sign * grad[i]\n"
           "    if weight_decay != 0:\n        g = g + weight_decay * p\n",
           "    amsgrad = flags[0]\n    p = decay * param[i]\n    g = sign * grad[i]\n"
           "    if weight_decay != 0:\n        g = g - weight_decay * p\n")),
        m(RULES, "Adam eps inside the bias-corrected sqrt",
          ("math.sqrt(v) * inv_bias_correction2_sqrt + eps", "math.sqrt(v + eps) * inv_bias_correction2_sqrt")),
        m(RULES, "Nesterov uses the buffer alone",
          ("            g = g + nesterov_momentum * b\n", "            g = b\n")),
        m(RULES, "SGD buffer ignores grad_scale",
          ("b = momentum * momentum_buffer[i] + grad_scale * g", "b = momentum * momentum_buffer[i] + g")),
        m(RULES, "Lion sign(0) = -1", ("    elif c < 0:\n        u = -lr", "    elif c <= 0:\n        u = -lr")),
        m(RULES, "Lion momentum from the interpolation",
          ("exp_avg[i] = beta2 * m + one_minus_beta2 * g", "exp_avg[i] = beta2 * c + one_minus_beta2 * g")),
    ],
}  # fmt: skip

#: The tests each file's mutants run (fast, sharp files first: -x stops at the first failure).
#: Files missing from the tests being run (older commits) are left out.
TESTS = {
    **dict.fromkeys(
        [SPECS_ADAM, SPECS_SGD],
        ["tests/test_scalars.py", "tests/test_specs.py", "tests/test_refusals.py",
         "tests/test_validation.py", "tests/test_api.py", "tests/test_reference.py"],
    ),
    SPEC_TYPES: ["tests/test_refusals.py", "tests/test_validation.py", "tests/test_specs.py",
                 "tests/test_scalars.py", "tests/test_api.py"],
    GROUPED: ["tests/test_refusals.py", "tests/test_validation.py", "tests/test_api.py",
              "tests/test_grouped.py"],
    GROUPS: ["tests/test_refusals.py", "tests/test_validation.py", "tests/test_api.py",
             "tests/test_grouped.py"],
    SCHEDULE: ["tests/test_grouped.py", "tests/test_api.py"],
    DIST: ["tests/test_distributed.py"],
    PART: ["tests/test_distributed.py"],
    CKPT: ["tests/test_distributed.py"],
    RULES: ["tests/test_specs.py", "tests/test_reference.py"],
    **dict.fromkeys(
        ["fastrms/torch.py", "fastrms/torch_optimizer.py", "fastrms/torch_buckets.py",
         "fastrms/torch_repeat.py", "fastrms/torch_checks.py", "fastrms/torch_layout.py"],
        ["tests/test_torch_refusals.py", "tests/test_torch_optim.py", "tests/test_torch_layouts.py",
         "tests/test_torch_specs.py", "tests/test_torch_parity.py"],
    ),
}  # fmt: skip


# -- mutants generated from the syntax tree (files without a listed set) ----------------------

_SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


def generated(file: str, source: str, count: int, seed: int) -> list[Mutant]:
    """``count`` mutants of ``source`` picked (by ``seed``) from every site of: an operator
    or comparison swapped, a number changed, a ``raise`` deleted, a call statement deleted."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def at(line: int, col: int) -> int:  # ast's columns count UTF-8 bytes
        return offsets[line - 1] + len(lines[line - 1].encode()[:col].decode())

    def span(node: ast.AST) -> tuple[int, int]:
        return at(node.lineno, node.col_offset), at(node.end_lineno, node.end_col_offset)

    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docstrings.add(id(body[0]))

    sites: list[tuple[ast.AST, ast.AST | None, str]] = []  # (node, replacement, what)
    for node in ast.walk(tree):
        if not hasattr(node, "lineno"):
            continue
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _SWAPS:
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.left, ast.Constant)
                and isinstance(node.left.value, str)
            ):
                continue  # "%" formatting and string concatenation
            new = _copy(node)
            new.op = _SWAPS[type(node.op)]()
            sites.append((node, new, f"{type(node.op).__name__} -> {type(new.op).__name__}"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAPS:
            new = _copy(node)
            new.ops = [_SWAPS[type(node.ops[0])]()] + node.ops[1:]
            sites.append(
                (node, new, f"{type(node.ops[0]).__name__} -> {type(new.ops[0]).__name__}")
            )
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = node.value + 1 if type(node.value) is int else node.value * 2 or 1.0
            sites.append((node, ast.Constant(value), f"{node.value!r} -> {value!r}"))
        elif isinstance(node, ast.Raise):
            sites.append((node, ast.Pass(), "raise deleted"))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            if id(node) not in docstrings:
                sites.append((node, ast.Pass(), "call statement deleted"))
    sites.sort(key=lambda s: (s[0].lineno, s[0].col_offset, s[2]))
    picked = sorted(random.Random(seed).sample(range(len(sites)), min(count, len(sites))))
    mutants = []
    for k in picked:
        node, new, what = sites[k]
        start, end = span(node)
        text = ast.unparse(new)
        if isinstance(node, ast.expr):
            text = f"({text})"
        mutants.append(Mutant(file, f"line {node.lineno}: {what}", [(f"@{start}:{end}", text)]))
    return mutants


def _copy(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node), mode="eval").body


def apply(source: str, mutant: Mutant) -> str:
    """``source`` with the mutant's edits; a listed snippet must occur exactly once."""
    for original, mutated in mutant.edits:
        if original.startswith("@") and ":" in original:  # a generated edit: a byte range
            start, end = map(int, original[1:].split(":"))
            source = source[:start] + mutated + source[end:]
            continue
        found = source.count(original)
        if found != 1:
            raise ValueError(f"{mutant.file}: {mutant.name}: snippet found {found} times")
        source = source.replace(original, mutated)
    return source


# -- running --------------------------------------------------------------------------------


def make_tree(where: Path, tests_rev: str | None) -> None:
    """A copy of the project's files (as git sees them: tracked and untracked, not ignored)
    at ``where``, with ``fastrms/kernels`` pointing at the copy's ``kernels/``."""
    if where.exists():
        shutil.rmtree(where)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, where / rel)  # the same mtimes: Numba's cache stays valid
    if tests_rev:
        shutil.rmtree(where / "tests")
        archive = subprocess.run(["git", "archive", tests_rev, "tests"], cwd=ROOT, check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    (where / "fastrms" / "kernels").symlink_to("../kernels")


def fresh_copy(base: Path, tree: Path) -> None:
    """``tree`` made a copy of ``base`` (same mtimes, the kernels link kept)."""
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(base, tree, symlinks=True)


def run_tests(tree: Path, tests: list[str], cache: Path, timeout: float) -> tuple[str, int, str]:
    """``(outcome, skipped, last lines)`` of ``pytest -x -q`` over ``tests`` in ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree), NUMBA_CACHE_DIR=str(cache),
               PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-o", "addopts=-rs --benchmark-disable", *tests]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", 0, f"over {timeout:.0f} s"
    out = done.stdout + done.stderr
    tail = " | ".join(line for line in out.strip().splitlines()[-3:])
    skipped = sum(1 for line in out.splitlines() if line.startswith("SKIPPED"))
    if done.returncode == 0:
        return "survived", skipped, tail
    if done.returncode == 5:  # no test collected: nothing was judged
        return "error", skipped, f"pytest exit 5: {tail}"
    # The unmutated tree passed the same command: a test failed (1), collecting or a conftest
    # failed (2, 4: e.g. an assertion of tests/conftest.py), or pytest itself broke (3).
    return "killed", skipped, tail


def check_tree(tree: Path, cache: Path) -> None:
    """The copy's fastrms, fastrms.kernels and tests are the ones imported, not the installed."""
    code = ("import fastrms, fastrms.kernels.rules as r; print(fastrms.__file__); "
            "print(r.__file__)")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tree), NUMBA_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    for path in out:
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the copy imports {path}, outside {tree}: check the install")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="files to mutate (default: the listed ones)")
    parser.add_argument("--tests", nargs="+", help="test files to run (default: per file)")
    parser.add_argument("--tests-rev", help="run the tests of this git revision instead")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    parser.add_argument("--per-file", type=int, default=12, help="generated mutants per file")
    parser.add_argument("--seed", type=int, default=22, help="seed of the generated mutants")
    parser.add_argument(
        "--generated",
        action="store_true",
        help="generate mutants even for the files with a listed set",
    )
    parser.add_argument("--only", help="run only the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--workdir", help="where to make the copies (default: a temp dir)")
    args = parser.parse_args(argv)

    files = args.files or list(MUTANTS)
    mutants: list[Mutant] = []
    for file in files:
        source = (ROOT / file).read_text()
        if file in MUTANTS and not args.generated:
            listed = MUTANTS[file]
        else:
            listed = generated(file, source, args.per_file, args.seed)
        for mutant in listed:  # every snippet still there, once, and the result valid Python
            compile(apply(source, mutant), file, "exec")
        mutants += [mu for mu in listed if not args.only or args.only in mu.name]
    if args.list:
        for mu in mutants:
            print(f"{mu.file}: {mu.name}")
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fastrms-mutants-"))
    work.mkdir(parents=True, exist_ok=True)
    base, tree, shared_cache = work / "base", work / "tree", work / "numba-cache"
    make_tree(base, args.tests_rev)  # one snapshot: later edits of the checkout do not leak in
    fresh_copy(base, tree)
    check_tree(tree, shared_cache)

    def tests_for(file: str) -> list[str]:
        wanted = args.tests or TESTS.get(file) or ["tests"]
        return [t for t in wanted if (tree / t).exists()]

    # The unmutated tree must pass every test file used (this also warms the shared cache).
    for tests in dict.fromkeys(tuple(tests_for(f)) for f in files):
        outcome, skipped, tail = run_tests(tree, list(tests), shared_cache, args.timeout)
        print(f"unmutated: {outcome} ({skipped} skipped) {' '.join(tests)}: {tail}", flush=True)
        if outcome != "survived":
            raise SystemExit("the unmutated tree fails its tests: no mutant can be judged")

    results: list[Result] = []
    for k, mu in enumerate(mutants, 1):
        fresh_copy(base, tree)
        target = tree / mu.file
        target.write_text(apply(target.read_text(), mu))
        cache = shared_cache
        if mu.file.startswith("kernels/"):
            cache = work / f"numba-cache-{k}"
        tests = tests_for(mu.file)
        t0 = time.perf_counter()
        outcome, skipped, tail = run_tests(tree, tests, cache, args.timeout)
        if cache != shared_cache:
            shutil.rmtree(cache, ignore_errors=True)
        r = Result(mu.file, mu.name, outcome, time.perf_counter() - t0, skipped, tail, tests)
        results.append(r)
        note = f" ({skipped} skipped)" if skipped else ""
        print(f"[{k}/{len(mutants)}] {outcome:8s} {r.seconds:6.0f} s  {mu.file}: {mu.name}{note}",
              flush=True)  # fmt: skip
        if outcome in ("survived", "error"):
            print(f"    {tail}", flush=True)

    print("\nkill rate (killed or timed out / mutants run; errors left out):")
    summary = {}
    for file in [*files, "overall"]:
        mine = [r for r in results if file in ("overall", r.file)]
        judged = [r for r in mine if r.outcome != "error"]
        killed = sum(r.outcome in ("killed", "timeout") for r in judged)
        summary[file] = {"killed": killed, "judged": len(judged), "errors": len(mine) - len(judged)}
        rate = f"{100 * killed / len(judged):.0f}%" if judged else "-"
        print(f"  {file:28s} {killed:3d} / {len(judged):3d}  {rate}")
    for r in results:
        if r.outcome == "survived":
            print(f"  survived: {r.file}: {r.name}")
    if args.json:
        payload = {"tests_rev": args.tests_rev, "summary": summary,
                   "results": [asdict(r) for r in results]}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
