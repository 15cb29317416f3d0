"""The MPI half of tests/test_distributed.py: run as ``mpirun -n N python tests/mpi_worker.py``.

Every rank checks ShardedOptimizer against the single-process optimizer stepped on the reduced
gradients, and prints ``mpi_worker OK`` at the end. A failed check aborts the whole job (so
the other ranks do not wait in a collective for ever).

Bit for bit: with 2 ranks always (a sum of two floats does not depend on the order), and with
any number of ranks when the gradients are small multiples of 2**-10, whose sums are exact in
any order. With 3 ranks and general gradients, MPI may add in another order than the
reference: there the results agree to float32 rounding (checked at rtol 1e-6).
"""

from __future__ import annotations

import io
import sys
import traceback

import numpy as np
from mpi4py import MPI

import fastrms
from fastrms.distributed import ShardedOptimizer
from fastrms.optim import OPTIMIZERS

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()

LR = {"RMSProp": 1e-2, "AdaGrad": 1e-1, "Adam": 1e-2, "AdamW": 1e-2, "SGD": 5e-2,
      "Adamax": 1e-2, "Adadelta": 1.0, "RAdam": 1e-2, "NAdam": 1e-2}  # fmt: skip
#: Each optimizer plainly, with every state array it has, and with its other switches.
CASES = [
    ("RMSProp", {}),
    ("RMSProp", dict(centered=True, momentum=0.9, weight_decay=0.1)),
    ("RMSProp", dict(eps_in_sqrt=True, maximize=True)),
    ("AdaGrad", {}),
    ("AdaGrad", dict(initial_accumulator_value=0.1, lr_decay=0.01, weight_decay=0.1)),
    ("AdaGrad", dict(eps_in_sqrt=True, maximize=True)),
    ("Adam", {}),
    ("Adam", dict(amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(maximize=True)),
    ("AdamW", {}),
    ("AdamW", dict(amsgrad=True)),
    ("SGD", {}),
    ("SGD", dict(momentum=0.9, dampening=0.5, weight_decay=0.1)),
    ("SGD", dict(momentum=0.9, nesterov=True, maximize=True)),
    ("Adamax", dict(weight_decay=0.1, maximize=True)),
    ("Adadelta", dict(rho=0.8, weight_decay=0.1, maximize=True)),
    ("RAdam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ("NAdam", dict(weight_decay=0.1, momentum_decay=0.006, maximize=True)),
]
#: Every other optimizer class made from a spec (Lion, and any added since), plainly: the
#: sharded optimizer must take any of them, with nothing in it listing them.
CASES += [(cls.__name__, {}) for cls in OPTIMIZERS.values() if cls.__name__ not in LR]
#: Tensor boundaries fall inside and between the ranks' ranges; one tensor is empty.
SHAPES = {"w": (5, 7), "b": (7,), "empty": (0,), "v": (3, 2, 2), "s": (1,)}
STEPS = 3


def grads_of(shapes: dict, dtype, step: int, exact: bool) -> list[dict]:
    """Every rank's gradients for one step (each rank computes all of them, to average)."""
    out = []
    for r in range(SIZE):
        rng = np.random.default_rng([step, r])
        g = {}
        for k, s in shapes.items():
            if exact:
                g[k] = (rng.integers(-1024, 1025, s) * 2.0**-10).astype(dtype)
            else:
                g[k] = rng.standard_normal(s).astype(dtype)
        out.append(g)
    return out


def reduced(all_grads: list[dict], average: bool) -> dict:
    total = {k: all_grads[0][k] + sum(g[k] for g in all_grads[1:]) for k in all_grads[0]}
    return {k: v / SIZE for k, v in total.items()} if average else total


def initial(shapes: dict, dtype) -> dict:
    rng = np.random.default_rng(7)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def same(a: dict, b: dict, what: str, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
    for k in a:
        x, y = a[k], b[k]
        if isinstance(y, np.ndarray):
            assert x.shape == y.shape and x.dtype == y.dtype, (what, k, x.shape, y.shape)
            if rtol:
                np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol, err_msg=f"{what} {k}")
            else:
                assert np.array_equal(x, y), (what, k, np.abs(x - y).max())
        else:
            assert x == y, (what, k, x, y)


def state_bytes(opt: fastrms.Optimizer) -> int:
    return sum(a.nbytes for arrays in opt.state.values() for a in arrays if a is not None)


def lr_of(name: str) -> float:
    """The learning rate a case runs at: :data:`LR`'s, else the class's default."""
    return LR.get(name, getattr(fastrms, name).spec.defaults["lr"])


def run_case(
    name: str, options: dict, dtype=np.float32, exact=None, average=True, reduce="reduce_scatter"
) -> None:
    """k steps of the sharded and the single-process optimizer; then the state dicts."""
    cls = getattr(fastrms, name)
    exact = SIZE > 2 if exact is None else exact
    p0 = initial(SHAPES, dtype)
    params, ref_params = {k: v.copy() for k, v in p0.items()}, {k: v.copy() for k, v in p0.items()}
    opt = ShardedOptimizer(cls, params, average=average, reduce=reduce, lr=lr_of(name), **options)
    ref = cls(ref_params, lr=lr_of(name), **options)
    what = f"{name} {options} {np.dtype(dtype)} exact={exact} average={average} {reduce}"
    for k in range(STEPS):
        all_grads = grads_of(SHAPES, dtype, k, exact)
        opt.step(all_grads[RANK])
        ref.step(reduced(all_grads, average))
    rtol = 0.0 if exact or SIZE <= 2 else 1e-6
    same(params, ref_params, what, rtol)
    assert opt.step_count == STEPS

    # The state, 1/N of it per rank: together exactly the single-process state.
    mine = opt.state_nbytes()
    per_rank = COMM.allgather(mine)
    assert sum(per_rank) == state_bytes(ref), (what, per_rank, state_bytes(ref))
    total = sum(v.size for v in p0.values())
    buffers = len(ref.state)
    assert mine <= -(-total // SIZE) * np.dtype(dtype).itemsize * buffers, (what, mine)

    # Sharded -> single process: the full state dict loads and steps on identically.
    sd = opt.state_dict()
    same(sd, ref.state_dict(), what + " state_dict", rtol)
    single_params = {k: v.copy() for k, v in params.items()}
    single = cls(single_params)
    single.load_state_dict(sd)
    g = grads_of(SHAPES, dtype, 99, exact=True)
    single.step(reduced(g, average))
    opt.step(g[RANK])
    same(single_params, params, what + " N -> 1", 0.0)
    # Single process -> sharded: a fresh ShardedOptimizer takes the reference's state.
    back = {k: v.copy() for k, v in ref_params.items()}
    resharded = ShardedOptimizer(cls, back, average=average)
    resharded.load_state_dict(ref.state_dict())
    assert resharded.lr == lr_of(name) and resharded.step_count == STEPS
    resharded.step(g[RANK])
    ref.step(reduced(g, average))
    same(back, ref_params, what + " 1 -> N", 0.0)
    # To one rank only.
    full = opt.state_dict()
    rooted = opt.state_dict(root=SIZE - 1)
    assert (rooted is None) == (RANK != SIZE - 1)
    if rooted is not None:
        same(rooted, full, what + " root", 0.0)


def check_layouts() -> None:
    """Single arrays, lists, mixed dtypes, parameters in one flat buffer, empty shards."""
    # One array; flat gradients too (the zero-copy paths).
    cases = [((41,), "reduce_scatter"), ((SIZE - 1 or 1,), "reduce"), ((6, 5), "reduce_scatter"),
             ((6, 5), "reduce")]  # fmt: skip
    for shape, reduce in cases:
        p0 = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
        p, q = p0.copy(), p0.copy()
        opt = ShardedOptimizer(fastrms.Adam, p, lr=0.01, reduce=reduce)
        ref = fastrms.Adam(q, lr=0.01)
        for k in range(STEPS):
            gs = grads_of({"x": shape}, np.float32, k, exact=True)
            opt.step(np.asfortranarray(gs[RANK]["x"]))  # not C-contiguous if 2-D
            ref.step(reduced(gs, True)["x"])
        assert np.array_equal(p, q), shape
        assert sum(COMM.allgather(opt.state_nbytes())) == state_bytes(ref)
        sd = opt.state_dict()
        assert set(sd) == set(ref.state_dict()), sorted(sd)

    # A list of float32 and float64 arrays: one flat partition per dtype.
    shapes = [(9,), (4, 3), (5,), (2, 2)]
    dtypes = [np.float32, np.float64, np.float32, np.float64]
    rng = np.random.default_rng(5)
    p0 = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    p, q = [a.copy() for a in p0], [a.copy() for a in p0]
    opt = ShardedOptimizer(fastrms.RMSProp, p, lr=0.01, momentum=0.9)
    ref = fastrms.RMSProp(q, lr=0.01, momentum=0.9)
    for k in range(STEPS):
        gs = [
            [(np.random.default_rng([k, r, i]).integers(-64, 65, s) / 64).astype(d)
             for i, (s, d) in enumerate(zip(shapes, dtypes))]
            for r in range(SIZE)
        ]  # fmt: skip
        opt.step(gs[RANK])
        ref.step([sum(g[i] for g in gs) / SIZE for i in range(len(shapes))])
    for a, b in zip(p, q):
        assert np.array_equal(a, b)
    same(opt.state_dict(), ref.state_dict(), "mixed dtypes")

    # Parameters (and gradients) as views of one flat buffer: gathered in place, no copies.
    sizes = [12, 1, 30, 7]
    arena = np.random.default_rng(6).standard_normal(sum(sizes)).astype(np.float32)
    ref_arena = arena.copy()
    cuts = np.cumsum([0, *sizes])
    p = [arena[a:b] for a, b in zip(cuts, cuts[1:])]
    q = [ref_arena[a:b] for a, b in zip(cuts, cuts[1:])]
    opt = ShardedOptimizer(fastrms.SGD, p, lr=0.1, momentum=0.9)
    ref = fastrms.SGD(q, lr=0.1, momentum=0.9)
    assert all(g.param_flat is not None for g in opt._groups)
    for k in range(STEPS):
        flat = [
            (np.random.default_rng([k, r]).integers(-64, 65, cuts[-1]) / 64).astype(np.float32)
            for r in range(SIZE)
        ]
        mine = [flat[RANK][a:b] for a, b in zip(cuts, cuts[1:])]
        opt.step(mine)
        mean = sum(flat) / SIZE
        ref.step([mean[a:b] for a, b in zip(cuts, cuts[1:])])
    assert np.array_equal(arena, ref_arena)

    # Fewer elements than ranks: some ranks own nothing and hold no state.
    tiny = {"a": np.ones(1, np.float32), "z": np.zeros((0, 3), np.float32)}
    tiny_ref = {k: v.copy() for k, v in tiny.items()}
    opt = ShardedOptimizer(fastrms.Adam, tiny, lr=0.5)
    ref = fastrms.Adam(tiny_ref, lr=0.5)
    for _ in range(2):
        gs = [{"a": np.full(1, r + 1.0, np.float32), "z": np.zeros((0, 3), np.float32)}
              for r in range(SIZE)]  # fmt: skip
        opt.step(gs[RANK])
        ref.step(reduced(gs, True))
    same(tiny, tiny_ref, "tiny")
    counts = COMM.allgather(opt.state_nbytes())
    assert sorted(counts) == [0] * (SIZE - 1) + [8], counts
    same(opt.state_dict(), ref.state_dict(), "tiny state_dict")
    opt.load_state_dict(ref.state_dict())


def expect_all(kind: type, fn, *contains: str) -> str:
    """``fn()`` must raise ``kind`` on this rank; it runs on every rank."""
    try:
        fn()
    except kind as exc:
        message = str(exc)
        for c in contains:
            assert c in message, (message, c)
        return message
    raise AssertionError(f"rank {RANK}: {fn} did not raise {kind.__name__}")


def check_bad_input() -> None:
    p0 = initial(SHAPES, np.float32)
    params = {k: v.copy() for k, v in p0.items()}
    opt = ShardedOptimizer(fastrms.Adam, params, lr=0.01, amsgrad=True)
    gs = grads_of(SHAPES, np.float32, 0, exact=True)
    opt.step(gs[RANK])
    before = {k: v.copy() for k, v in params.items()}
    sd_before = opt.state_dict()
    last = SIZE - 1

    def unchanged():
        same(params, before, "params after a refused call")
        same(opt.state_dict(), sd_before, "state after a refused call")

    # The last rank's gradient has another shape: every rank raises, nothing changes.
    bad = dict(gs[RANK])
    if RANK == last:
        bad["w"] = np.zeros((7, 5), np.float32)
    message = expect_all(ValueError, lambda: opt.step(bad), "grads['w']")
    assert RANK == last or f"rank {last}" in message, message
    unchanged()
    # Another dtype on rank 0 only.
    bad = dict(gs[RANK])
    if RANK == 0:
        bad["b"] = bad["b"].astype(np.float64)
    expect_all(TypeError, lambda: opt.step(bad), "grads['b']", "dtype")
    unchanged()
    # A missing key, on every rank.
    expect_all(ValueError, lambda: opt.step({"w": gs[RANK]["w"]}), "missing")
    unchanged()
    # Hyperparameters changed on one rank only.
    if RANK == last:
        opt.lr = 0.02
    if SIZE > 1:
        expect_all(ValueError, lambda: opt.step(gs[RANK]), "disagree")
    opt.lr = 0.01
    unchanged()
    # A bad hyperparameter on every rank: raised by each rank's own check.
    opt.betas = (0.9, 1.5)
    expect_all(ValueError, lambda: opt.step(gs[RANK]), "beta")
    opt.betas = (0.9, 0.999)
    unchanged()
    # A bad state dict on one rank: every rank raises, none loads it.
    sd = dict(sd_before)
    if RANK == last:
        sd["state.exp_avg.w"] = np.zeros((2, 2), np.float32)
    expect_all(ValueError, lambda: opt.load_state_dict(sd), "state.exp_avg.w")
    unchanged()
    sd = {k: v for k, v in sd_before.items() if not k.startswith("state.max_exp_avg_sq")}
    expect_all(ValueError, lambda: opt.load_state_dict(sd), "state.max_exp_avg_sq")
    unchanged()
    expect_all(ValueError, lambda: opt.state_dict(root=SIZE), "root")
    # A state dict that went through np.savez loads.
    f = io.BytesIO()
    np.savez(f, **sd_before)
    f.seek(0)
    opt.load_state_dict(dict(np.load(f)))
    unchanged()

    # Construction: the wrong communicator, classes, and params that differ between ranks.
    expect_all(TypeError, lambda: ShardedOptimizer(fastrms.Adam, params, comm="world"), "comm")
    expect_all(
        TypeError, lambda: ShardedOptimizer(fastrms.Adam, params, comm=MPI.COMM_NULL), "comm"
    )
    expect_all(TypeError, lambda: ShardedOptimizer("adam", params), "optimizer")
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, params, reduce="ring"), "reduce")
    expect_all(TypeError, lambda: ShardedOptimizer(fastrms.Adam, params, lr=0.1, betaz=1), "betaz")
    mismatched = dict(params)
    if RANK == last:
        mismatched["w"] = np.zeros((7, 5), np.float32)
    if SIZE > 1:
        expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, mismatched), "disagree")
    ro = dict(params)
    if RANK == 0:
        ro["b"] = ro["b"].copy()
        ro["b"].flags.writeable = False
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, ro), "read-only")
    # A dict key that is not a str (its state-dict key would be ambiguous), as the NumPy
    # classes refuse it: the one parameter tree (fastrms.tree) checks for both.
    keyed = {**params, 3: np.zeros(2, np.float32)}
    expect_all(
        TypeError, lambda: ShardedOptimizer(fastrms.Adam, keyed), "params dict keys must be str"
    )
    expect_all(
        TypeError, lambda: opt.step({**gs[RANK], 3: gs[RANK]["w"]}), "grads dict keys must be str"
    )
    lr = -1.0 if RANK == last else 0.1
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, params, lr=lr), "lr")
    unchanged()


def check_refusals_after_steps() -> None:
    """Two good steps over float64 and float32 parameters (the float32 group last), then a
    step made bad in the last group in each way, on every rank or on the last rank only:
    every rank raises a TypeError/ValueError naming the argument, and not one bit of any
    rank's parameters, state or step count changes."""
    shapes = {"a": (6,), "b": (5, 3), "c": (4,), "d": (2, 3)}
    dtypes = {"a": np.float64, "b": np.float64, "c": np.float32, "d": np.float32}
    rng = np.random.default_rng(22)
    params = {k: rng.standard_normal(s).astype(dtypes[k]) for k, s in shapes.items()}
    opt = ShardedOptimizer(fastrms.Adam, params, lr=0.01, amsgrad=True)

    def grads(step: int) -> dict:
        return {k: (np.random.default_rng([step, RANK, i]).integers(-64, 65, s) / 64)
                .astype(dtypes[k]) for i, (k, s) in enumerate(shapes.items())}  # fmt: skip

    for step in range(2):
        opt.step(grads(step))
    assert opt.step_count == 2
    inner = opt._inner
    last = SIZE - 1

    def refused(kind: type, fn, *contains: str, on_last_only: bool = False) -> None:
        before = {k: v.copy() for k, v in params.items()}
        state = {(s, i): a.copy() for s, arrays in inner.state.items()
                 for i, a in enumerate(arrays) if isinstance(a, np.ndarray)}  # fmt: skip
        counts = opt.step_count, inner.step_count
        message = expect_all(kind, fn, *contains)  # the other ranks quote the last one
        assert not on_last_only or RANK == last or f"rank {last} failed" in message, message
        same(params, before, f"params after a refused step ({message})")
        for (s, i), a in state.items():
            assert inner.state[s][i].tobytes() == a.tobytes(), (message, s, i)
        assert (opt.step_count, inner.step_count) == counts, message

    g = grads(2)
    # A bad hyperparameter, and scalars that fit float64 but not the float32 group.
    for name, value, words in [("lr", -1.0, "lr must be"), ("lr", 1e39, "float32"),
                               ("eps", 1e-50, "eps = 1e-50 does not fit in float32")]:  # fmt: skip
        good = getattr(opt, name)
        setattr(opt, name, value)
        refused(ValueError, lambda: opt.step(g), words)  # noqa: B023
        setattr(opt, name, good)
    # A corrupt state array of this rank's last piece, on the last rank only.
    s = "max_exp_avg_sq"
    good = inner.state[s][-1]
    if RANK == last:
        inner.state[s][-1] = np.zeros(good.size + 1, good.dtype)
    refused(ValueError, lambda: opt.step(g), "shape", on_last_only=True)
    inner.state[s][-1] = good
    # A corrupt step count, on the last rank only.
    if RANK == last:
        inner.step_count = -1
    refused(ValueError, lambda: opt.step(g), "step_count", on_last_only=True)
    inner.step_count = 2
    # A gradient that overlaps a parameter, on the last rank only.
    bad = dict(g)
    if RANK == last:
        bad["d"] = params["d"]
    refused(ValueError, lambda: opt.step(bad), "grads['d'] overlaps params['d']",
            on_last_only=True)  # fmt: skip
    bad = dict(g)
    if RANK == last:
        bad["d"] = np.zeros((2, 3), np.float64)
    refused(TypeError, lambda: opt.step(bad), "grads['d']", "dtype", on_last_only=True)
    # Put right, the step goes on as if nothing had happened.
    ref_params = {k: v.copy() for k, v in params.items()}
    ref = ShardedOptimizer(fastrms.Adam, ref_params, lr=0.01, amsgrad=True)
    ref.load_state_dict(opt.state_dict())
    opt.step(g)
    ref.step(g)
    same(params, ref_params, "after the refusals")


def check_cuda() -> None:
    """CUDA arrays (under Numba's CUDA simulator: the code path, not a CUDA-aware MPI):
    against the single-process optimizer on the same device, bit for bit."""
    from numba import cuda

    shapes = {"w": (3, 5), "b": (4,), "s": (1,)}
    for name, options, reduce in [
        ("Adam", dict(amsgrad=True, weight_decay=0.1), "reduce_scatter"),
        ("RMSProp", dict(centered=True, momentum=0.9), "reduce"),
    ]:
        cls = getattr(fastrms, name)
        p0 = initial(shapes, np.float32)
        params = {k: cuda.to_device(v) for k, v in p0.items()}
        ref_params = {k: cuda.to_device(v) for k, v in p0.items()}
        opt = ShardedOptimizer(cls, params, reduce=reduce, lr=lr_of(name), **options)
        ref = cls(ref_params, lr=lr_of(name), **options)
        for k in range(STEPS):
            all_grads = grads_of(shapes, np.float32, k, exact=True)
            opt.step({k: cuda.to_device(v) for k, v in all_grads[RANK].items()})
            ref.step({k: cuda.to_device(v) for k, v in reduced(all_grads, True).items()})
        host = {k: v.copy_to_host() for k, v in params.items()}
        same(host, {k: v.copy_to_host() for k, v in ref_params.items()}, f"cuda {name}")
        same(opt.state_dict(), ref.state_dict(), f"cuda {name} state_dict")
        opt.load_state_dict(ref.state_dict())
        assert sum(COMM.allgather(opt.state_nbytes())) == state_bytes(ref)
        # A host gradient for a device parameter: refused on every rank.
        bad = {k: cuda.to_device(v) for k, v in all_grads[RANK].items()}
        if RANK == 0:
            bad["b"] = all_grads[RANK]["b"]
        expect_all(TypeError, lambda: opt.step(bad), "grads['b']", "CUDA")  # noqa: B023
        same({k: v.copy_to_host() for k, v in params.items()}, host, "cuda refused step")


def main() -> None:
    if "--cuda" in sys.argv:
        check_cuda()
        COMM.Barrier()
        print(f"mpi_worker OK rank {RANK} of {SIZE}: CUDA (simulator)", flush=True)
        return
    n = 0
    for name, options in CASES:
        run_case(name, options)
        n += 1
    run_case("Adam", dict(amsgrad=True), dtype=np.float64)
    run_case("RMSProp", dict(momentum=0.9), average=False)
    run_case("AdaGrad", {}, exact=False)  # general gradients: bitwise with 2 ranks only
    run_case("Adam", dict(amsgrad=True), reduce="reduce")
    run_case("SGD", dict(momentum=0.9), reduce="reduce", average=False)
    check_layouts()
    check_bad_input()
    check_refusals_after_steps()
    COMM.Barrier()
    print(f"mpi_worker OK rank {RANK} of {SIZE}: {n + 5} optimizer cases", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        sys.stdout.write(f"mpi_worker FAILED on rank {RANK} of {SIZE}:\n{traceback.format_exc()}")
        sys.stdout.flush()
        COMM.Abort(1)
