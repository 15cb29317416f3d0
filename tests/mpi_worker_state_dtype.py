"""The MPI half of tests/test_distributed_state_dtype.py: ``mpirun -n N python
tests/mpi_worker_state_dtype.py``. ShardedOptimizer with ``state_dtype="bfloat16"``.

Every rank checks the sharded optimizer against the single-process class with
``state_dtype="bfloat16"`` stepped on the reduced gradients (bit for bit: the gradients are
small multiples of 2**-10, whose sums are exact in any order), its shards' memory (2 bytes per
element and state array), its state dicts (gathered as bfloat16, bit for bit; with
``dequantize=True`` as float32, exactly), checkpoints between state dtypes and rank counts,
and its refusals. Prints ``mpi_worker OK`` at the end; a failed check aborts the job.
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


def run_case(name: str, options: dict) -> None:
    cls = getattr(fastrms, name)
    what = f"{name} {options} bf16"
    p0 = initial(SHAPES, np.float32)
    params = {k: v.copy() for k, v in p0.items()}
    ref_params = {k: v.copy() for k, v in p0.items()}
    lr = lr_of(name)
    opt = ShardedOptimizer(cls, params, lr=lr, state_dtype="bfloat16", **options)
    ref = cls(ref_params, lr=lr, state_dtype="bfloat16", **options)
    for k in range(STEPS):
        all_grads = grads_of(SHAPES, np.float32, k, exact=True)
        opt.step(all_grads[RANK])
        ref.step(reduced(all_grads, True))
    bits_equal(params, ref_params, what)

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


def check_refusals() -> None:
    p = {k: v.copy() for k, v in initial(SHAPES, np.float32).items()}
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, p, state_dtype="int4"),
               "state_dtype must be one of")  # fmt: skip
    expect_all(ValueError, lambda: ShardedOptimizer(fastrms.Adam, p, state_dtype="int8"),
               "state_dtype='int8' is not supported by the sharded optimizer yet")  # fmt: skip
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
    check_refusals()
    COMM.Barrier()
    print(f"mpi_worker OK rank {RANK} of {SIZE}: {len(CASES)} bf16 state cases", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        sys.stdout.write(f"mpi_worker FAILED on rank {RANK} of {SIZE}:\n{traceback.format_exc()}")
        sys.stdout.flush()
        COMM.Abort(1)
