"""Tensors stepped in pieces, as the sharded optimizer's ranks step theirs (issue 18).

- ``StepPlan(offsets=, streams=)``: a bfloat16 tensor stepped whole equals it stepped as
  pieces, each with its tensor's stream and the index of its first element, bit for bit, under
  stochastic rounding (the random bits are the whole tensor's), on the cpu kernels and the
  numpy reference; offsets count mod 2^32, as the element indices of the bits do.
- ``StepPlan(sizes=)``: int8 state is decided on the whole tensor's size, and a tensor stepped
  as block-aligned pieces equals it stepped whole (codes, scales and parameters).
- :func:`fastrms.shard_partition.aligned_bounds`: cuts inside a blockwise tensor fall on
  multiples of 256 of it, and the pieces still cover every element once.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_same_bits
from test_bf16_params import _fresh_state, _problem

from fastrms import lowprecision
from fastrms.grouped import StepPlan, key_words
from fastrms.shard_partition import aligned_bounds, partition
from fastrms.specs import SPECS

STEPS = 3
N = 5000
CUT = 1700


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16)


def _run(params, grads, backend, rounding, streams=None, offsets=None, seed=11):
    """Adam over ``params`` for ``len(grads)`` steps through one StepPlan."""
    state = _fresh_state("adam", {}, params, None, rounding)
    names = [f"params[{i}]" for i in range(len(params))]
    plan = StepPlan(SPECS["adam"].setup(1), params, state, names, backend, team=None,
                    parallel_threshold=0, rounding=rounding, seed=seed, streams=streams,
                    offsets=offsets)  # fmt: skip
    for step, g in enumerate(grads, start=1):
        plan.run(g, SPECS["adam"].setup(step), step)
    return state


def _pieces(a: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    return [a[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, a.size])]


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_a_tensor_stepped_as_pieces_with_offsets_equals_it_stepped_whole(backend, rounding):
    (p,), grads = _problem(3, sizes=(N,))
    whole = p.copy()
    whole_state = _run([whole], [[g[0]] for g in grads], backend, rounding, streams=[2])
    split = p.copy()
    cuts = [CUT, CUT + 1, 4096]
    pieces = _pieces(split, cuts)
    piece_state = _run(pieces, [_pieces(g[0], cuts) for g in grads], backend, rounding,
                       streams=[2] * len(pieces), offsets=[0, *cuts])  # fmt: skip
    assert_same_bits(_bits(split), _bits(whole), f"{backend} {rounding} params")
    for s, (w,) in whole_state.items():
        assert_same_bits(np.concatenate(piece_state[s]), w, f"{backend} {rounding} {s}")


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_without_offsets_the_pieces_draw_other_bits(backend):
    """The check above can fail: pieces stepped from index 0 each round otherwise."""
    (p,), grads = _problem(3, sizes=(N,))
    whole, split = p.copy(), p.copy()
    _run([whole], [[g[0]] for g in grads], backend, "stochastic", streams=[0])
    pieces = _pieces(split, [CUT])
    _run(pieces, [_pieces(g[0], [CUT]) for g in grads], backend, "stochastic", streams=[0, 0])
    assert np.array_equal(_bits(split[:CUT]), _bits(whole[:CUT]))
    assert not np.array_equal(_bits(split[CUT:]), _bits(whole[CUT:]))


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_offsets_count_mod_2_to_the_32(backend):
    """An offset of 2^32 + k draws the bits of index k: the hash reads indices mod 2^32."""
    (p,), grads = _problem(4, sizes=(700,))
    a, b = p.copy(), p.copy()
    _run([a], [[g[0]] for g in grads], backend, "stochastic", offsets=[5])
    _run([b], [[g[0]] for g in grads], backend, "stochastic", offsets=[2**32 + 5])
    assert_same_bits(_bits(a), _bits(b))


def test_key_words_put_the_offset_in_the_high_half():
    keys = np.array([0, 1, 2**32 - 1], np.int64)
    words = key_words(keys, np.array([0, 3, 2**32 + 9], np.int64))
    assert (words.view(np.uint64) & np.uint64(0xFFFFFFFF)).tolist() == keys.tolist()
    assert (words.view(np.uint64) >> np.uint64(32)).tolist() == [0, 3, 9]


@pytest.mark.parametrize("bad", [[1], [0, -1], [0.5, 1.0]])
def test_bad_offsets_are_refused(bad):
    params = [np.zeros(3, np.float32), np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="offsets must hold one int >= 0 per parameter"):
        StepPlan(SPECS["sgd"].setup(1), params, {}, ["a", "b"], "numpy", offsets=bad)


# -- int8 state: the threshold on the whole tensor ---------------------------------------------


def _int8_state(pieces: list[np.ndarray], whole: int | None) -> dict:
    """Adam's int8 state of each piece, as the optimizer makes it (8 bits if the tensor is
    big enough)."""
    out = {}
    for s in ("exp_avg", "exp_avg_sq"):
        signed = s == "exp_avg"
        big = lowprecision.uses_8bit(whole or 0)
        out[s] = [lowprecision.Quantized.of(np.zeros(p.size, np.float32), signed) if big
                  else np.zeros(p.size, np.float32) for p in pieces]  # fmt: skip
    return out


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_int8_pieces_of_a_big_tensor_are_8_bit_and_step_as_the_whole(backend):
    rng = np.random.default_rng(5)
    p = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(STEPS)]
    cuts = [256, 3072]  # pieces of 256, 2816 and 1928 elements: each under 4096
    runs = []
    for parts, sizes in (([p.copy()], None), (_pieces(p.copy(), cuts), [N] * 3)):
        state = _int8_state(parts, N)
        names = [f"params[{i}]" for i in range(len(parts))]
        plan = StepPlan(SPECS["adam"].setup(1), parts, state, names, backend, team=None,
                        state_dtype="int8", sizes=sizes)  # fmt: skip
        for step, g in enumerate(grads, start=1):
            gs = [g] if len(parts) == 1 else _pieces(g, cuts)
            plan.run(gs, SPECS["adam"].setup(step))
        runs.append((np.concatenate(parts), state))
    (want, want_state), (got, got_state) = runs
    assert_same_bits(got, want)
    for s in want_state:
        (w,) = want_state[s]
        assert_same_bits(np.concatenate([q.codes for q in got_state[s]]), w.codes, s)
        assert_same_bits(np.concatenate([q.scales for q in got_state[s]]), w.scales, s)


def test_int8_pieces_without_sizes_keep_float32_state():
    """A piece under 4096 elements is refused 8-bit state unless ``sizes`` says its tensor
    is big: the threshold is the piece's own by default."""
    piece = np.zeros(1000, np.float32)
    state = _int8_state([piece], N)
    with pytest.raises(TypeError, match="keeps float32 state"):
        StepPlan(SPECS["adam"].setup(1), [piece], state, ["p"], "numpy", state_dtype="int8")
    StepPlan(SPECS["adam"].setup(1), [piece], state, ["p"], "numpy", state_dtype="int8",
             sizes=[N])  # fmt: skip


# -- the partition -------------------------------------------------------------------------------


@pytest.mark.parametrize("nranks", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("seed", range(6))
def test_aligned_partition_cuts_blockwise_tensors_on_blocks(nranks, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 9000, rng.integers(1, 6)).tolist()
    aligns = [256 if n >= 4096 else 1 for n in sizes]
    b = aligned_bounds(sizes, nranks, aligns)
    assert b[0] == 0 and b[-1] == sum(sizes) and all(x <= y for x, y in zip(b, b[1:]))
    owner = [np.full(n, -1) for n in sizes]
    for r, pieces in enumerate(partition(sizes, nranks, aligns)):
        offset = b[r]
        for p in pieces:
            assert p.offset == offset
            offset += p.stop - p.start
            if aligns[p.index] > 1:
                assert p.start % 256 == 0 and (p.stop % 256 == 0 or p.stop == sizes[p.index])
            assert (owner[p.index][p.start : p.stop] == -1).all()
            owner[p.index][p.start : p.stop] = r
        assert offset == b[r + 1]
    assert all((o >= 0).all() for o in owner)
    even = np.diff(aligned_bounds(sizes, nranks, None))
    assert even.max() - even.min() <= 1  # no aligns: the even split
    assert np.abs(np.array(b) - aligned_bounds(sizes, nranks)).max() <= 128  # moved to nearest


def test_aligned_bounds_move_a_cut_to_the_nearest_block_or_the_end():
    assert aligned_bounds([5000], 2, [256]) == [0, 2560, 5000]  # 2500 -> 2560
    assert aligned_bounds([5000, 300], 2, [256, 1]) == [0, 2560, 5300]  # 2650 -> 2560
    assert aligned_bounds([4990, 10], 2, [256, 1]) == [0, 2560, 5000]
    assert aligned_bounds([5000], 4, [256]) == [0, 1280, 2560, 3840, 5000]
    assert aligned_bounds([4900, 4880], 2, [256, 256]) == [0, 4900, 9780]  # 4890: the end
