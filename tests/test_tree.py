"""maetok.tree: paths, leaf order, round trips, multi-tree maps, errors raised inside fn."""

from __future__ import annotations

import numpy as np
import pytest

from maetok.tree import flatten, iter_leaves, leaves, map_tree, map_with_path, unflatten

TREE = {"b": {"y": 1, "x": np.arange(3)}, "a": 2, "c": {"z": {"k": "leaf"}, "e": {}}}


def test_paths_and_order():
    assert list(iter_leaves(TREE)) == [
        ("a", 2),
        ("b/x", TREE["b"]["x"]),
        ("b/y", 1),
        ("c/z/k", "leaf"),
    ]
    assert [path for path, _ in iter_leaves(TREE, "root")] == [
        "root/a",
        "root/b/x",
        "root/b/y",
        "root/c/z/k",
    ]
    assert leaves(TREE) == [2, TREE["b"]["x"], 1, "leaf"]
    assert list(flatten(TREE)) == ["a", "b/x", "b/y", "c/z/k"]


def test_round_trip():
    flat = flatten(TREE)
    back = unflatten(flat)
    assert flatten(back) == flat
    assert back["c"] == {"z": {"k": "leaf"}}  # an empty dict holds no leaf and is not kept
    assert unflatten({"p/q": 1, "p/r": 2, "s": 3}) == {"p": {"q": 1, "r": 2}, "s": 3}


def test_map_tree_keeps_structure_and_order():
    out = map_tree(lambda v: (v,), TREE)
    assert list(out) == ["b", "a", "c"] and list(out["b"]) == ["y", "x"]
    assert out["b"]["y"] == (1,) and out["c"]["e"] == {}
    assert map_tree(lambda v: v + 1, 5) == 6  # a leaf is mapped as itself


def test_map_tree_over_several_trees():
    a = {"p": {"q": 1.0, "r": 2.0}, "s": 3.0}
    b = {"p": {"q": 10.0, "r": 20.0}, "s": 30.0}
    c = {"p": {"q": 100.0, "r": 200.0}, "s": 300.0}
    assert map_tree(lambda x, y, z: x + y + z, a, b, c) == {
        "p": {"q": 111.0, "r": 222.0},
        "s": 333.0,
    }
    with pytest.raises(KeyError):
        map_tree(lambda x, y: x + y, a, {"p": {"q": 1.0}, "s": 1.0})


def test_map_with_path():
    out = map_with_path(lambda path, leaf: f"{path}={leaf}", {"p": {"q": 1}, "s": 2}, "root")
    assert out == {"p": {"q": "root/p/q=1"}, "s": "root/s=2"}
    assert map_with_path(lambda path, leaf: path, {"p": {"q": 1}}) == {"p": {"q": "p/q"}}


@pytest.mark.parametrize(
    "walk", [lambda fn, t: map_tree(fn, t), lambda fn, t: map_with_path(lambda p, x: fn(x), t)]
)
def test_error_inside_fn_propagates_once(walk):
    calls = []

    def fn(leaf):
        calls.append(leaf)
        if leaf == 2:
            raise TypeError("bad leaf")
        return leaf

    with pytest.raises(TypeError, match="bad leaf"):
        walk(fn, {"a": 1, "b": {"c": 2}, "d": 3})
    assert calls == [1, 2]  # the failing call is not retried, and the walk stops there
