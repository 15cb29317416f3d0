"""Golden run: digests of every optimizer's results, to prove a refactor bit-identical.

For every optimizer, every combination of its options (booleans, numeric options off or at
their example value), float32 and float64, it steps seeded random data 3 times through each
route (the NumPy reference, one-array CPU calls small and large, the grouped step, the NumPy
classes, and fastrms.torch when torch is installed) and records a SHA-256 of the parameters and
state. Run it on the old commit, then on the new one, and compare::

    python .ci/golden.py --out /tmp/before.json
    python .ci/golden.py --compare /tmp/before.json

Only the optimizers both runs know are compared; new ones are listed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys

import numpy as np

import fastrms
from fastrms import functional
from fastrms.specs import SPECS

SIZES = (1000, 300_000)  # serial and parallel loops
STEPS = 3
FIRST_MOMENTS = {"exp_avg", "momentum_buffer", "grad_avg"}


def grid(spec) -> list[dict]:
    axes = {}
    for o in spec.options:
        if o.kind == "fixed":
            continue
        if isinstance(o.default, bool):
            axes[o.name] = (False, True)
        elif o.example is not None:
            axes[o.name] = (0.0, o.example)
    cases = []
    for values in itertools.product(*axes.values()):
        case = dict(zip(axes, values))
        try:
            spec.setup(1, **case)
        except ValueError:
            continue
        cases.append(case)
    return cases


def data(n: int, dtype, slots, seed: int):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(STEPS)]
    # Second moments start above the square of any first moment, so that a centered
    # variance stays positive and the digests see numbers rather than NaN.
    state = {
        s: (
            np.abs(rng.standard_normal(n)) * (0.1 if s in FIRST_MOMENTS else 1)
            + 0.5 * (s not in FIRST_MOMENTS)
        ).astype(dtype)
        for s in slots
    }
    return p, grads, state


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def lr_of(spec) -> float:
    return 10 * spec.defaults["lr"] if spec.defaults["lr"] < 0.1 else spec.defaults["lr"]


def functional_route(spec, options, n, dtype, backend) -> str:
    step_options = {k: v for k, v in options.items() if k in spec.step_options}
    setup = spec.setup(1, **step_options)
    p, grads, state = data(n, dtype, setup.state, 1)
    for t, g in enumerate(grads, 1):
        functional.multi_tensor_step(
            spec.name, [p[: n // 3], p[n // 3 :]], [g[: n // 3], g[n // 3 :]],
            {s: [a[: n // 3], a[n // 3 :]] for s, a in state.items()},
            step=t, backend=backend, lr=lr_of(spec), **step_options,
        )  # fmt: skip
    return digest(p, *state.values())


def one_array_route(spec, options, n, dtype, backend) -> str:
    step_options = {k: v for k, v in options.items() if k in spec.step_options}
    setup = spec.setup(1, **step_options)
    p, grads, state = data(n, dtype, setup.state, 1)
    fn = getattr(functional, spec.name)
    for t, g in enumerate(grads, 1):
        kwargs = dict(step_options, lr=lr_of(spec), backend=backend)
        if spec.counts_steps:
            kwargs["step"] = t
        fn(p, g, **state, **kwargs)
    return digest(p, *state.values())


def class_route(spec, options, n, dtype) -> str:
    cls = fastrms.optim.OPTIMIZERS[spec.name]
    rng = np.random.default_rng(2)
    params = [
        rng.standard_normal(n // 2).astype(dtype),
        rng.standard_normal(n - n // 2).astype(dtype),
    ]
    opt = cls(params, **dict(options, lr=lr_of(spec)))
    for _ in range(STEPS):
        opt.step([rng.standard_normal(a.size).astype(dtype) for a in params])
    state = opt.state_dict()
    return digest(*params, *[np.asarray(v) for v in _leaves(state)])


def _leaves(x):
    if isinstance(x, dict):
        for k in sorted(x, key=str):
            yield from _leaves(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, np.ndarray) or isinstance(x, (int, float)):
        yield x


def torch_route(spec, options, n, dtype) -> str | None:
    try:
        import torch

        import fastrms.torch as ft
    except ImportError:
        return None
    cls = next(
        (
            c
            for c in vars(ft).values()
            if isinstance(c, type) and getattr(c, "_spec_name", None) == spec.name
        ),
        None,
    )
    if cls is None:
        return None
    kwargs = {k: v for k, v in options.items() if k != "eps_in_sqrt"}
    if options.get("eps_in_sqrt"):
        return None
    torch_dtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n // 2, generator=gen, dtype=torch_dtype, requires_grad=True)]
    opt = cls(params, **dict(kwargs, lr=lr_of(spec)))
    for _ in range(STEPS):
        params[0].grad = torch.randn(n // 2, generator=gen, dtype=torch_dtype)
        opt.step()
    state = [t.numpy() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return digest(params[0].detach().numpy(), *state)


def run() -> dict[str, str]:
    out = {}
    for name, spec in SPECS.items():
        for options in grid(spec):
            oid = ",".join(f"{k}={v}" for k, v in options.items())
            for dtype in (np.float32, np.float64):
                d = np.dtype(dtype).name
                for n in SIZES:
                    for backend in ("numpy", "cpu"):
                        out[f"{name}|{oid}|{d}|{n}|one|{backend}"] = one_array_route(
                            spec, options, n, dtype, backend
                        )
                        out[f"{name}|{oid}|{d}|{n}|grouped|{backend}"] = functional_route(
                            spec, options, n, dtype, backend
                        )
                out[f"{name}|{oid}|{d}|class"] = class_route(spec, options, 5000, dtype)
                t = torch_route(spec, options, 5000, dtype)
                if t is not None:
                    out[f"{name}|{oid}|{d}|torch"] = t
        print(f"{name}: done", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the digests to this JSON file")
    parser.add_argument("--compare", help="compare with the digests in this JSON file")
    args = parser.parse_args()
    digests = run()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(digests, f, indent=0, sort_keys=True)
        print(f"{len(digests)} digests written to {args.out}")
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        common = sorted(set(before) & set(digests))
        differ = [k for k in common if before[k] != digests[k]]
        missing = sorted(set(before) - set(digests))
        new = sorted({k.split("|")[0] for k in set(digests) - set(before)})
        print(f"{len(common)} compared, {len(differ)} differ, {len(missing)} missing; new: {new}")
        for k in differ[:50] + missing[:20]:
            print("  ", k)
        return 1 if differ or missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
