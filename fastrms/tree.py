"""The parameter tree: how fastrms takes a structure of arrays, names its leaves and keys them.

Parameters come as one array, a list or tuple of arrays, or a dict of str -> array; the
gradients of a step come in the same structure. :class:`Tree` is that structure without its
arrays: it flattens a structure (:func:`flatten`), matches gradients to it (with the messages
every frontend gives when they do not match), names each leaf in errors (``params``,
``params[3]``, ``params['w']``) and keys its state in state dicts (``state.exp_avg``,
``state.exp_avg.3``, ``state.exp_avg.w``). The NumPy classes (:mod:`fastrms.optim`) and the
sharded optimizer (:mod:`fastrms.distributed`) both hold one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Params = Any  # an array, a list/tuple of arrays, or a dict of str -> array

ARRAY, LIST, DICT = "array", "list", "dict"


def flatten(params: Params, what: str) -> tuple[str, list, list]:
    """``(structure, keys, arrays)`` of ``params``: ``"dict"`` with its str keys, ``"list"``
    (of a list or tuple) with the positions, or ``"array"`` with the key ``None``.

    Raises ``TypeError`` (naming ``what``) for a dict key that is not a str.
    """
    if isinstance(params, Mapping):
        keys = list(params)
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"{what} dict keys must be str, got {k!r}")
        return DICT, keys, list(params.values())
    if isinstance(params, (list, tuple)):
        return LIST, list(range(len(params))), list(params)
    return ARRAY, [None], [params]


class Tree:
    """The structure of a parameter collection, and its leaves' names and state-dict keys.

    Parameters
    ----------
    params : array, list/tuple of arrays, or dict of str -> array
    what : str
        The argument's name in errors (``"params"``).

    Attributes
    ----------
    structure : {"array", "list", "dict"}
    keys : list
        The leaves' keys, in order: ``[None]``, positions, or the dict's keys.
    arrays : list
        The leaves, in the order of ``keys``.
    """

    __slots__ = ("structure", "keys", "arrays", "_key_index")

    def __init__(self, params: Params, what: str = "params") -> None:
        self.structure, self.keys, self.arrays = flatten(params, what)
        self._key_index: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def labels(self, what: str) -> list[str]:
        """Each leaf's name in errors: ``what`` for one array, else ``what[key]``."""
        if self.structure == ARRAY:
            return [what]
        return [f"{what}[{k!r}]" for k in self.keys]

    # -- matching another structure (the gradients) to this one ------------------------------

    def match(self, grads: Params, what: str = "grads") -> list:
        """The arrays of ``grads`` in the order of this tree's leaves (a dict pairs by key,
        whatever its order). Raises ``TypeError``/``ValueError`` naming ``what`` if ``grads``
        is not structured like this tree."""
        if self.structure == LIST and isinstance(grads, (list, tuple)):  # the common case
            if len(grads) != len(self.keys):
                raise ValueError(f"{what} has {len(grads)} arrays but params has {len(self.keys)}")
            return grads if isinstance(grads, list) else list(grads)
        structure, keys, arrays = flatten(grads, what)
        if structure != self.structure:
            raise TypeError(
                f"{what} must be structured like params (a {self.structure}), got {structure}"
            )
        if structure == DICT:
            if set(keys) != set(self.keys):
                missing = sorted(set(self.keys) - set(keys), key=str)
                extra = sorted(set(keys) - set(self.keys), key=str)
                raise ValueError(
                    f"{what} keys differ from params keys: missing {missing}, unexpected {extra}"
                )
            by_key = dict(zip(keys, arrays))
            return [by_key[k] for k in self.keys]
        return arrays  # one array, as params is

    # -- state-dict keys -----------------------------------------------------------------------

    def state_key(self, name: str, i: int) -> str:
        """The state-dict key of state array ``name`` of leaf ``i``."""
        if self.structure == ARRAY:
            return f"state.{name}"
        return f"state.{name}.{self.keys[i]}"

    def state_keys(self, names) -> dict[str, tuple[str, int]]:
        """``{key: (name, i)}`` for each state name in ``names`` and each leaf."""
        return {self.state_key(s, i): (s, i) for s in names for i in range(len(self.keys))}

    def state_order(self, key: str) -> tuple[str, int]:
        """``(state name, leaf index)`` of a state-dict key of this tree: the order in which
        state dicts list their state (by name, then as the leaves)."""
        key = key.removesuffix(":codes").removesuffix(":scales")  # int8 state's two entries
        name = key.split(".")[1]
        if self.structure == ARRAY:
            return name, 0
        if self._key_index is None:
            self._key_index = {str(k): i for i, k in enumerate(self.keys)}
        return name, self._key_index[key[len("state.") + len(name) + 1 :]]


def state_names(state_dict: Mapping) -> set[str]:
    """The state names (``exp_avg``, ...) that keys of ``state_dict`` hold."""
    return {k.split(".")[1] for k in state_dict if isinstance(k, str) and k.startswith("state.")}
