"""The parameter tree (fastrms.tree), the state store (fastrms.state) and the one parameter
check (fastrms.arrays.check_params) that the NumPy classes and the sharded optimizer share.

The frontends' behaviour is tested through them elsewhere (test_api, test_state_dict,
test_validation, test_refusals, test_distributed); these pin the shared pieces themselves.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastrms
from fastrms import specs
from fastrms.arrays import check_params
from fastrms.state import StateStore, checked_entry, is_step_count, plain
from fastrms.tree import Tree, flatten, state_names


def _arrays(n: int, size: int = 3) -> list[np.ndarray]:
    return [np.arange(size, dtype=np.float32) + 10 * i for i in range(n)]


# -- the tree -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, structure, keys, labels, key1",
    [
        (np.zeros(2), "array", [None], ["params"], None),
        ([np.zeros(2), np.zeros(3)], "list", [0, 1], ["params[0]", "params[1]"], "state.m.1"),
        ((np.zeros(2), np.zeros(3)), "list", [0, 1], ["params[0]", "params[1]"], "state.m.1"),
        (
            {"w": np.zeros(2), "b": np.zeros(3)}, "dict", ["w", "b"],
            ["params['w']", "params['b']"], "state.m.b",
        ),
    ],
)  # fmt: skip
def test_tree_flattens_names_and_keys(params, structure, keys, labels, key1):
    tree = Tree(params)
    assert (tree.structure, tree.keys, tree.labels("params")) == (structure, keys, labels)
    assert len(tree) == len(keys)
    assert tree.state_key("m", 0) == ("state.m" if structure == "array" else f"state.m.{keys[0]}")
    assert tree.state_order(tree.state_key("m", 0)) == ("m", 0)
    if key1 is not None:
        assert tree.state_key("m", 1) == key1
        assert tree.state_order(key1) == ("m", 1)
    assert set(tree.state_keys(["m", "v"]).values()) == {
        (s, i) for s in "mv" for i in range(len(keys))
    }


def test_tree_refuses_keys_that_are_not_str():
    with pytest.raises(TypeError, match=r"^params dict keys must be str, got 3$"):
        Tree({"w": np.zeros(2), 3: np.zeros(2)})
    with pytest.raises(TypeError, match=r"^grads dict keys must be str, got 1$"):
        flatten({1: np.zeros(2)}, "grads")


def test_match_pairs_a_dict_by_key_whatever_its_order():
    a, b = np.zeros(2), np.ones(3)
    tree = Tree({"w": np.zeros(2), "b": np.zeros(3)})
    got = tree.match({"b": b, "w": a})
    assert got[0] is a and got[1] is b


def test_match_keeps_a_list_and_lists_a_tuple():
    tree = Tree(_arrays(2))
    grads = _arrays(2)
    assert tree.match(grads) is grads
    assert tree.match(tuple(grads)) == grads


@pytest.mark.parametrize(
    "params, grads, error, message",
    [
        (_arrays(2), _arrays(3), ValueError, r"^grads has 3 arrays but params has 2$"),
        (_arrays(2), np.zeros(3), TypeError, r"^grads must be structured like params \(a list\)"),
        (np.zeros(3), _arrays(1), TypeError, r"^grads must be structured like params \(a array\)"),
        (
            {"w": np.zeros(2), "b": np.zeros(2)}, {"w": np.zeros(2), "c": np.zeros(2)},
            ValueError, r"^grads keys differ from params keys: missing \['b'\], unexpected \['c'\]",
        ),
    ],
)  # fmt: skip
def test_match_refuses_another_structure(params, grads, error, message):
    with pytest.raises(error, match=message):
        Tree(params).match(grads)


def test_state_names():
    sd = {"step": 1, "state.exp_avg.w": 0, "state.exp_avg_sq": 0, 3: 0, "hyper.lr": 0}
    assert state_names(sd) == {"exp_avg", "exp_avg_sq"}


# -- the state store ----------------------------------------------------------------------------


def _store(spec=specs.ADAGRAD, n: int = 2) -> StateStore:
    return StateStore(spec, Tree({f"p{i}": a for i, a in enumerate(_arrays(n))}))


def test_store_makes_state_lazily_at_its_initial_value():
    store = _store()
    assert store.arrays == {}
    a = store.get("state_sum", 1, {"initial_accumulator_value": 0.25})
    assert store.arrays["state_sum"][0] is None  # only what was asked for
    assert a.dtype == np.float32 and a.shape == (3,) and np.all(a == 0.25)
    assert store.get("state_sum", 1, {"initial_accumulator_value": 9.0}) is a  # made once
    adam = _store(specs.ADAM)
    assert np.all(adam.get("exp_avg", 0, {}) == 0)


def test_store_places_each_state_array_its_own_kib_after_the_parameter():
    """Slot k (the k-th state array of the layout) starts k KiB after the parameter modulo
    4 KiB, so that no two arrays of one loop alias (fastrms.dispatch._staggered_zeros_like)."""
    p = np.zeros(20_000, np.float32)  # large enough to be placed
    store = StateStore(specs.ADAM, Tree(p))
    for k, name in enumerate(specs.ADAM.layout.slots, start=1):
        a = store.get(name, 0, {})
        gap = (a.ctypes.data - p.ctypes.data - 1024 * k) % 4096
        assert gap < 64, (name, gap)  # then rounded up to 64-byte alignment


def test_store_forgets_only_what_a_refused_step_made():
    store = _store(specs.ADAM)
    kept = store.get("exp_avg", 0, {})
    state = store.prepare(("exp_avg", "exp_avg_sq"), {})
    assert state["exp_avg"][0] is kept and all(a is not None for a in state["exp_avg_sq"])
    assert store.forget()
    assert store.arrays == {"exp_avg": [kept, None]}
    assert not store.forget()  # nothing left to forget
    store.prepare(("exp_avg",), {})
    store.keep()
    assert not store.forget() and store.arrays["exp_avg"][1] is not None


def test_store_refuses_a_replaced_state_list():
    store = _store(specs.ADAM)
    store.arrays["exp_avg"] = [np.zeros(3, np.float32)]  # one array for two parameters
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] must be a list of one array"):
        store.prepare(("exp_avg",), {})
    assert store.arrays == {"exp_avg": [store.arrays["exp_avg"][0]]}  # nothing made


def test_store_entries_round_trip_and_are_checked():
    store = _store(specs.ADAM)
    store.prepare(("exp_avg", "exp_avg_sq"), {})
    store.arrays["exp_avg"][1][:] = 7
    sd = store.entries(("exp_avg",), {})
    assert sorted(sd) == ["state.exp_avg.p0", "state.exp_avg.p1", "state.exp_avg_sq.p0",
                          "state.exp_avg_sq.p1"]  # fmt: skip
    assert sd["state.exp_avg.p1"] is not store.arrays["exp_avg"][1]  # a copy
    other = _store(specs.ADAM)
    arrays = other.take_entries(dict(sd), ("exp_avg",))
    other.load(arrays, {})
    assert np.all(other.arrays["exp_avg"][1] == 7) and other.nbytes() == store.nbytes() == 48
    with pytest.raises(ValueError, match=r"state_dict lacks 'state.exp_avg.p0'"):
        other.take_entries({}, ("exp_avg",))
    assert other.take_entries({}, ()) == {}  # state these options do not use may be missing
    bad = {**sd, "state.exp_avg.p0": np.zeros(3)}
    with pytest.raises(ValueError, match=r"state.exp_avg.p0'\] has shape \(3,\) and dtype float64"):
        other.take_entries(bad, ("exp_avg",))


def test_checked_entry_and_step_counts():
    p = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"and dtype int64, but the parameter .* float32$"):
        checked_entry("k", [[1, 2, 3], [4, 5, 6]], p)
    with pytest.raises(ValueError, match=r"^state_dict\['k'\] has shape \(3, 2\)"):
        checked_entry("k", np.zeros((3, 2), np.float32), p)
    assert checked_entry("k", np.ones((2, 3), np.float32), p).sum() == 6
    assert [is_step_count(x) for x in (0, 5, np.int64(0), np.int64(3))] == [True] * 4
    assert [is_step_count(x) for x in (-1, True, 1.0, "1", None, np.int32(-2))] == [False] * 6
    assert plain(np.array(3)) == 3 and plain(np.array([0.9, 0.99])) == (0.9, 0.99)


# -- the one parameter check --------------------------------------------------------------------


class _FakeDeviceArray:
    """A host buffer that says it is CUDA memory: enough for the checks, which only read its
    ``__cuda_array_interface__``."""

    def __init__(self, a: np.ndarray) -> None:
        self._a = a
        self.__cuda_array_interface__ = {
            "shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False),
            "strides": None, "version": 3,
        }  # fmt: skip


def test_check_params_refuses_with_the_parameter_named():
    good = _arrays(2)
    assert [i.shape for i in check_params(good, ["a", "b"])] == [(3,), (3,)]
    with pytest.raises(TypeError, match=r"^b must have dtype float32 or float64, got int64"):
        check_params([good[0], np.zeros(3, np.int64)], ["a", "b"])
    with pytest.raises(ValueError, match=r"^b is not C-contiguous"):
        check_params([good[0], np.zeros((3, 4), np.float32).T], ["a", "b"])
    ro = good[1].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"^b is read-only"):
        check_params([good[0], ro], ["a", "b"])
    with pytest.raises(ValueError, match=r"^b overlaps a in memory"):
        check_params([good[0], good[0][1:]], ["a", "b"])
    device = _FakeDeviceArray(np.zeros(3, np.float32))
    check_params([good[0], device], ["a", "b"])  # the NumPy classes step each on its side
    with pytest.raises(TypeError, match=r"^b and a must all be NumPy arrays or all CUDA"):
        check_params([good[0], device], ["a", "b"], one_side=True)


def test_optimizer_state_is_its_store():
    params = _arrays(2)
    opt = fastrms.Adam(params)
    assert opt.state == {}
    opt.step(_arrays(2))
    assert opt.state is opt._store.arrays and sorted(opt.state) == ["exp_avg", "exp_avg_sq"]
    opt.state = {}
    assert opt._store.arrays == {}
