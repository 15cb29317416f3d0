"""The MPI half of tests/test_distributed_state_dtype.py: ``mpirun -n N python
tests/mpi_worker_state_dtype.py``. ShardedOptimizer with low-precision state and parameters.

Every rank checks the sharded optimizer against the single-process class stepped on the
reduced gradients, bit for bit (the gradients are small multiples of 2**-10, whose sums are
exact in any order):

- ``state_dtype="bfloat16"``: its shards' memory (2 bytes per element and state array), its
  state dicts (gathered as bfloat16, bit for bit; with ``dequantize=True`` as float32,
  exactly), checkpoints between state dtypes and rank counts;
- ``state_dtype="int8"`` over tensors of 5000 (a ragged last block), 300 (under 4096: float32
  state) and 70x90 elements, cut on 256-element blocks, pieces of the big ones under 4096
  elements: parameters, codes and scales after 3 steps, each rank's bytes, state dicts as
  held and dequantized, N -> 1 and 1 -> N, float32 <-> int8 checkpoints;
- bfloat16 parameters under each ``rounding`` (with ``seed=``), beside a float32 one, against
  the single-process class stepped on the bfloat16-rounded mean gradient; with a shard that
  holds no bfloat16 element, and with a rank that holds no element at all; state dict round
  trips with the Kahan compensation;
- the refusals of what stays refused.

Prints ``mpi_worker OK`` at the end; a failed check aborts the job.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from mpi_worker import COMM, RANK, SHAPES, SIZE, expect_all, grads_of, initial, lr_of, reduced

import fastrms
from fastrms import lowprecision
from fastrms.distributed import ShardedOptimizer

BF16 = lowprecision.BFLOAT16
STEPS = 3
CASES = [
    ("Adam", dict(amsgrad=True, weight_decay=0.1)),
    ("RMSProp", dict(centered=True, momentum=0.9)),
    ("SGD", dict(momentum=0.9)),
    ("AdaGrad", dict(initial_accumulator_value=0.1)),
    ("Lion", {}),
]


def bits_equal(a: dict, b: dict, what: str) -> None:
    """Equal keys; equal arrays of equal dtype bit for bit (bfloat16 by its patterns)."""
    assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
    for k in a:
        x, y = a[k], b[k]
        if isinstance(y, np.ndarray):
            assert x.shape == y.shape and x.dtype == y.dtype, (what, k, x.dtype, y.dtype)
            assert x.tobytes() == y.tobytes(), (what, k)
        else:
            assert x == y, (what, k, x, y)


def state_keys(sd: dict) -> list[str]:
    return [k for k in sd if k.startswith("state.")]


def stepped_twins(name: str, options: dict, shapes: dict, state_dtype: str):
    """A sharded optimizer and the single-process class, each over its own copy of the same
    float32 parameters, after STEPS steps (the reference on the reduced gradients); their
    results are checked equal, bit for bit. Returns ``(cls, p0, params, ref_params, opt,
    ref)``."""
    cls = getattr(fastrms, name)
    p0 = initial(shapes, np.float32)
    params = {k: v.copy() for k, v in p0.items()}
    ref_params = {k: v.copy() for k, v in p0.items()}
    lr = lr_of(name)
    opt = ShardedOptimizer(cls, params, lr=lr, state_dtype=state_dtype, **options)
    ref = cls(ref_params, lr=lr, state_dtype=state_dtype, **options)
    for k in range(STEPS):
        all_grads = grads_of(shapes, np.float32, k, exact=True)
        opt.step(all_grads[RANK])
        ref.step(reduced(all_grads, True))
    bits_equal(params, ref_params, f"{name} {options} {state_dtype}")
    return cls, p0, params, ref_params, opt, ref


def run_case(name: str, options: dict) -> None:
    what = f"{name} {options} bf16"
    cls, p0, params, ref_params, opt, ref = stepped_twins(name, options, SHAPES, "bfloat16")

    # The shards hold bfloat16: 2 bytes per element per state array, 1/N of them per rank.
    ref_bytes = sum(a.nbytes for arrays in ref.state.values() for a in arrays)
    per_rank = COMM.allgather(opt.state_nbytes())
    assert sum(per_rank) == ref_bytes, (what, per_rank, ref_bytes)
    total = sum(v.size for v in p0.values())
    assert per_rank[RANK] <= -(-total // SIZE) * 2 * len(ref.state), (what, per_rank)
    assert all(a.dtype == BF16 for arrays in opt._inner.state.values() for a in arrays)

    # Gathered as held, bit for bit; dequantized exactly; rooted alike.
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    bits_equal(sd, ref_sd, what + " state_dict")
    assert all(sd[k].dtype == BF16 for k in state_keys(sd))
    wide = opt.state_dict(dequantize=True)
    for k in state_keys(sd):
        assert wide[k].dtype == np.float32
        assert np.array_equal(
            wide[k].view(np.uint32), lowprecision.bf16_to_float32(sd[k]).view(np.uint32)
        )
    rooted = opt.state_dict(root=0, dequantize=True)
    assert (rooted is None) == (RANK != 0)
    if rooted is not None:
        bits_equal(rooted, wide, what + " rooted")

    # N -> 1 (bf16), 1 -> N (bf16): both step on as the reference.
    g = grads_of(SHAPES, np.float32, 99, exact=True)
    single_params = {k: v.copy() for k, v in params.items()}
    single = cls(single_params, state_dtype="bfloat16")
    single.load_state_dict(sd)
    back = {k: v.copy() for k, v in ref_params.items()}
    resharded = ShardedOptimizer(cls, back, state_dtype="bfloat16")
    resharded.load_state_dict(ref_sd)
    single.step(reduced(g, True))
    resharded.step(g[RANK])
    opt.step(g[RANK])
    ref.step(reduced(g, True))
    bits_equal(single_params, params, what + " N -> 1")
    bits_equal(back, ref_params, what + " 1 -> N")
    bits_equal(opt.state_dict(), ref.state_dict(), what + " state after")

    # Between state dtypes: bfloat16 -> float32 state widens exactly, float32 -> bfloat16
    # rounds to nearest even.
    f32_params = {k: v.copy() for k, v in params.items()}
    f32 = ShardedOptimizer(cls, f32_params)
    sd = opt.state_dict()
    f32.load_state_dict(sd)
    f32_sd = f32.state_dict()
    for k in state_keys(sd):
        assert f32_sd[k].dtype == np.float32
        assert np.array_equal(
            f32_sd[k].view(np.uint32), lowprecision.bf16_to_float32(sd[k]).view(np.uint32)
        )
    f32.step(g[RANK])  # float32 state now differs from bf16's: round it back in
    f32_sd = f32.state_dict()
    low = ShardedOptimizer(cls, {k: v.copy() for k, v in params.items()}, state_dtype="bfloat16")
    low.load_state_dict(f32_sd)
    low_sd = low.state_dict()
    for k in state_keys(f32_sd):
        assert low_sd[k].dtype == BF16
        assert np.array_equal(
            lowprecision.bf16_bits(low_sd[k]), lowprecision.round_nearest(f32_sd[k])
        )


# -- int8 state ----------------------------------------------------------------------------------

#: 5000 elements (19 blocks and a ragged one of 136), 300 (under 4096: float32 state), 70x90.
#: With 2 ranks the cut falls inside "c", with 3 inside "a" and "c" (moved onto blocks), and
#: some pieces of the big tensors have under 4096 elements: their state is still 8-bit.
INT8_SHAPES = {"a": (5000,), "b": (300,), "c": (70, 90)}
INT8_CASES = [("Adam", dict(amsgrad=True)), ("SGD", dict(momentum=0.9))]


def int8_bytes(opt: ShardedOptimizer, params: dict) -> int:
    """The bytes this rank's pieces take per state array: codes and one float32 scale per
    block where the whole tensor has 4096 elements or more, float32 elsewhere."""
    sizes = [v.size for v in params.values()]
    return sum(
        (p.stop - p.start) + 4 * lowprecision.n_blocks(p.stop - p.start)
        if lowprecision.uses_8bit(sizes[p.index]) else 4 * (p.stop - p.start)
        for p in opt.pieces
    )  # fmt: skip


def run_int8_case(name: str, options: dict) -> None:
    what = f"{name} {options} int8"
    cls, p0, params, ref_params, opt, ref = stepped_twins(name, options, INT8_SHAPES, "int8")
    for p in opt.pieces:  # cuts inside an 8-bit tensor are on blocks
        if p0[list(INT8_SHAPES)[p.index]].size >= 4096:
            assert p.start % 256 == 0, (what, p)
    held = [a for arrays in opt._inner.state.values() for a in arrays]
    assert any(isinstance(a, lowprecision.Quantized) for a in held), what

    # Each rank holds its blocks' codes and scales: the real bytes, adding up to the whole.
    assert opt.state_nbytes() == int8_bytes(opt, params) * len(ref.state), what
    per_rank = COMM.allgather(opt.state_nbytes())
    assert sum(per_rank) == sum(a.nbytes for arrays in ref.state.values() for a in arrays)

    # Gathered as held (":codes"/":scales" entries, bit for bit) or dequantized (as the
    # single-process class dequantizes); rooted alike.
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    bits_equal(sd, ref_sd, what + " state_dict")
    assert any(k.endswith(":codes") for k in sd) and any(k.endswith(".b") for k in sd)
    wide = opt.state_dict(dequantize=True)
    bits_equal(wide, ref.state_dict(dequantize=True), what + " dequantized")
    assert all(wide[k].dtype == np.float32 for k in state_keys(wide))
    rooted = opt.state_dict(root=SIZE - 1)
    assert (rooted is None) == (RANK != SIZE - 1)
    if rooted is not None:
        bits_equal(rooted, sd, what + " rooted")

    # N -> 1 and 1 -> N (pairs sliced by block): both step on as the reference.
    g = grads_of(INT8_SHAPES, np.float32, 99, exact=True)
    single_params = {k: v.copy() for k, v in params.items()}
    single = cls(single_params, state_dtype="int8", **options)
    single.load_state_dict(sd)
    back = {k: v.copy() for k, v in ref_params.items()}
    resharded = ShardedOptimizer(cls, back, state_dtype="int8", **options)
    resharded.load_state_dict(ref_sd)
    single.step(reduced(g, True))
    resharded.step(g[RANK])
    opt.step(g[RANK])
    ref.step(reduced(g, True))
    bits_equal(single_params, params, what + " N -> 1")
    bits_equal(back, ref_params, what + " 1 -> N")
    bits_equal(opt.state_dict(), ref.state_dict(), what + " state after")

    # float32 state -> int8: quantized on load, as the single-process class quantizes it;
    # int8 -> float32 state (cuts not on blocks there): dequantized.
    f32 = ShardedOptimizer(cls, {k: v.copy() for k, v in params.items()}, **options)
    f32.load_state_dict(opt.state_dict())
    bits_equal(f32.state_dict(), opt.state_dict(dequantize=True), what + " int8 -> f32")
    f32.step(g[RANK])
    f32_sd = f32.state_dict()
    low = ShardedOptimizer(cls, {k: v.copy() for k, v in params.items()}, state_dtype="int8",
                           **options)  # fmt: skip
    low.load_state_dict(f32_sd)
    low_ref = cls({k: v.copy() for k, v in params.items()}, state_dtype="int8", **options)
    low_ref.load_state_dict(f32_sd)
    bits_equal(low.state_dict(), low_ref.state_dict(), what + " f32 -> int8")


# -- bfloat16 parameters -------------------------------------------------------------------------

#: bfloat16 tensors around a float32 one (the float32 group is cut apart from the bf16 one).
BF16_SHAPES = {"w": (5000,), "f": (300,), "v": (7, 3)}


def bf16_grads(shapes: dict, dtypes: dict, step: int) -> list[dict]:
    """Every rank's gradients: exact multiples of 2**-10, as bfloat16 for bfloat16 params."""
    return [{k: g[k].astype(dtypes[k]) for k in g} for g in grads_of(shapes, np.float32, step,
                                                                    exact=True)]  # fmt: skip


def bf16_reduced(all_grads: list[dict]) -> dict:
    """The reference's gradient: the float32 mean, rounded to nearest even where bfloat16."""
    out = {}
    for k, g in all_grads[0].items():
        mean = sum(r[k].astype(np.float32) for r in all_grads) / np.float32(SIZE)
        out[k] = mean.astype(g.dtype)
    return out


def run_bf16_case(
    rounding: str,
    shapes: dict,
    dtypes: dict,
    name: str = "Adam",
    reduce="reduce_scatter",
    flat: bool = False,
    state_dtype: str | None = None,
) -> None:
    """``flat``: the parameters are views of one buffer (all-gathered in place)."""
    cls = getattr(fastrms, name)
    what = f"{name} bf16 params {rounding} {shapes} {reduce} flat={flat} state={state_dtype}"
    rng = np.random.default_rng(17)
    p0 = {k: rng.standard_normal(s).astype(dtypes[k]) for k, s in shapes.items()}
    params = {k: v.copy() for k, v in p0.items()}
    if flat:
        buffer = np.concatenate([v.reshape(-1) for v in p0.values()])
        ends = np.cumsum([v.size for v in p0.values()]).tolist()
        params = {k: buffer[e - v.size : e].reshape(v.shape)
                  for (k, v), e in zip(p0.items(), ends)}  # fmt: skip
    ref_params = {k: v.copy() for k, v in p0.items()}
    low = dict(rounding=rounding, seed=12345, state_dtype=state_dtype)
    opt = ShardedOptimizer(cls, params, lr=0.01, reduce=reduce, **low)
    ref = cls(ref_params, lr=0.01, **low)
    assert opt.rounding == rounding
    for k in range(STEPS):
        all_grads = bf16_grads(shapes, dtypes, k)
        opt.step(all_grads[RANK])
        ref.step(bf16_reduced(all_grads))
    bits_equal(params, ref_params, what)
    sd, ref_sd = opt.state_dict(), ref.state_dict()
    bits_equal(sd, ref_sd, what + " state_dict")
    assert (f"state.kahan_comp.{next(iter(shapes))}" in sd) == (rounding == "kahan")
    wide = opt.state_dict(dequantize=True)
    for k in state_keys(sd) if state_dtype is None else ():  # int8: run_int8_case checks it
        want = lowprecision.bf16_to_float32(sd[k]) if sd[k].dtype == BF16 else sd[k]
        assert wide[k].dtype == np.float32 and np.array_equal(wide[k], want), (what, k)
    assert sum(COMM.allgather(opt.state_nbytes())) == sum(
        a.nbytes for arrays in ref.state.values() for a in arrays if a is not None
    )

    # N -> 1 and 1 -> N: both step on as the reference, bit for bit (the same seed).
    g = bf16_grads(shapes, dtypes, 99)
    single_params = {k: v.copy() for k, v in params.items()}
    single = cls(single_params, **low)
    single.load_state_dict(sd)
    back = {k: v.copy() for k, v in ref_params.items()}
    resharded = ShardedOptimizer(cls, back, **low)
    # A float32 compensation loads exactly; int8 codes and scales load as held.
    resharded.load_state_dict(wide if rounding == "kahan" and state_dtype is None else ref_sd)
    single.step(bf16_reduced(g))
    resharded.step(g[RANK])
    opt.step(g[RANK])
    ref.step(bf16_reduced(g))
    bits_equal(single_params, params, what + " N -> 1")
    bits_equal(back, ref_params, what + " 1 -> N")
    bits_equal(opt.state_dict(), ref.state_dict(), what + " state after")


def run_bf16_cases() -> None:
    dtypes = {"w": BF16, "f": np.float32, "v": BF16}
    for rounding in ("stochastic", "nearest", "kahan"):
        run_bf16_case(rounding, BF16_SHAPES, dtypes)
    # One MPI_Reduce per rank's range; bfloat16 parameters in one buffer, gathered in place.
    run_bf16_case("stochastic", {"w": (5000,), "v": (7, 3)}, {"w": BF16, "v": BF16},
                  reduce="reduce", flat=True)  # fmt: skip
    # Two bfloat16 elements on N ranks: a rank whose shard is float32 only (no Kahan
    # compensation of its own), and with 3 ranks, one rank that holds no bf16 element at all.
    run_bf16_case("kahan", {"x": (2,), "f": (40,)}, {"x": BF16, "f": np.float32})
    run_bf16_case("stochastic", {"x": (2,)}, {"x": BF16}, "Lion")  # an empty rank with 3
    # bfloat16 parameters with int8 state: blockwise beside the 5000-element one, float32
    # beside the small ones (their whole size decides, not the pieces').
    for rounding in ("stochastic", "kahan"):
        run_bf16_case(rounding, BF16_SHAPES, dtypes, state_dtype="int8")


def check_refusals() -> None:
    p = {k: v.copy() for k, v in initial(SHAPES, np.float32).items()}
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, p, state_dtype="int4"),
               "state_dtype must be one of")  # fmt: skip
    bf = {k: v.astype(BF16) for k, v in p.items()}
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, bf, state_dtype="float64"),
               "state_dtype='float64' needs float64 parameters, but params['w'] has dtype "
               "bfloat16")  # fmt: skip
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, p, rounding="nearest"),
               "rounding= applies to bfloat16 parameters only")  # fmt: skip
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, bf, rounding="up"),
               "rounding must be one of")  # fmt: skip
    expect_all(TypeError, lambda: ShardedOptimizer(fastrms.Adam, bf, seed=1.5),
               "seed must be an int")  # fmt: skip
    f16 = {k: v.astype(np.float16) for k, v in p.items()}
    expect_all(TypeError, lambda: ShardedOptimizer(fastrms.Adam, f16),
               "must have dtype float32 or float64 (or bfloat16), got float16")  # fmt: skip
    # int8 scales that do not fit the codes: refused, and the optimizer keeps its state.
    q = {k: v.copy() for k, v in initial(INT8_SHAPES, np.float32).items()}
    opt8 = ShardedOptimizer(fastrms.Adam, q, state_dtype="int8")
    opt8.step(grads_of(INT8_SHAPES, np.float32, 0, exact=True)[RANK])
    before8 = opt8.state_dict()
    bad8 = dict(before8)
    bad8["state.exp_avg.a:scales"] = before8["state.exp_avg.a:scales"][:-1]
    expect_all(ValueError, lambda: opt8.load_state_dict(bad8), "scales of state_dict",
               "state.exp_avg.a", "expected (20,)")  # fmt: skip
    bits_equal(opt8.state_dict(), before8, "refused int8 load")
    mixed = dict(p)
    if RANK == SIZE - 1:  # on one rank only: every rank raises all the same
        mixed["b"] = mixed["b"].astype(np.float64)
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, mixed, state_dtype="bfloat16"),
               "needs float32 parameters")  # fmt: skip
    f64 = {k: v.astype(np.float64) for k, v in p.items()}
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, f64, state_dtype="bfloat16"),
               "needs float32 parameters, but params['w'] has dtype float64")  # fmt: skip
    # A state dict entry of another dtype than bfloat16 or the parameter's: refused, and the
    # optimizer keeps its state.
    opt = ShardedOptimizer(fastrms.Adam, p, state_dtype="bfloat16")
    opt.step(grads_of(SHAPES, np.float32, 0, exact=True)[RANK])
    sd = opt.state_dict()
    before = opt.state_dict()
    bad = dict(sd)
    bad["state.exp_avg.w"] = sd["state.exp_avg.w"].astype(np.float16)
    expect_all(ValueError, lambda: opt.load_state_dict(bad), "state.exp_avg.w")
    bits_equal(opt.state_dict(), before, "refused load")


def main() -> None:
    for name, options in CASES:
        run_case(name, options)
    for name, options in INT8_CASES:
        run_int8_case(name, options)
    run_bf16_cases()
    check_refusals()
    COMM.Barrier()
    print(f"mpi_worker OK rank {RANK} of {SIZE}: {len(CASES)} bf16 state cases, "
          f"{len(INT8_CASES)} int8 state cases, bf16 parameters", flush=True)  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        sys.stdout.write(f"mpi_worker FAILED on rank {RANK} of {SIZE}:\n{traceback.format_exc()}")
        sys.stdout.flush()
        COMM.Abort(1)
