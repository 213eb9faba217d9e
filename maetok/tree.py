"""Nested-dict trees: the one set of walkers over parameter, optimiser and checkpoint trees.

A tree is a plain ``dict`` whose values are trees or leaves; anything that is not a dict
is a leaf (an array, a tensor, a ``ParamSpec``, a number, a NamedTuple). A leaf's path
joins its keys with ``/`` (``"encoder/blocks/qkv/w"``), the names checkpoints store.

Functions that build a tree (``map_tree``, ``map_with_path``) keep the input's key order;
functions that list leaves (``iter_leaves``, ``leaves``, ``flatten``) visit keys sorted,
depth first, which is ``jax.tree_util``'s order, so a sum over leaves runs in the same
order in every backend. Empty dicts hold no leaf and vanish in ``flatten``. No framework
is imported: the torch backend walks its trees with these, the JAX backend uses
``jax.tree_util`` on arrays under ``jit``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Tree = dict[str, Any]


def map_tree(fn: Callable, tree, *rest):
    """``fn(leaf, *leaves_of_rest)`` at every leaf of ``tree``; each of ``rest`` is a tree
    with (at least) the keys of ``tree``. A leaf for ``tree`` gives ``fn(tree, *rest)``."""
    if isinstance(tree, dict):
        return {k: map_tree(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    return fn(tree, *rest)


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree, prefix: str = "") -> Tree:
    """``fn(path, leaf)`` at every leaf; paths start with ``prefix/`` when ``prefix`` is given."""
    return {
        k: map_with_path(fn, v, _join(prefix, k))
        if isinstance(v, dict)
        else fn(_join(prefix, k), v)
        for k, v in tree.items()
    }


def iter_leaves(tree: Tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf, keys sorted, depth first."""
    for key in sorted(tree):
        path, value = _join(prefix, key), tree[key]
        if isinstance(value, dict):
            yield from iter_leaves(value, path)
        else:
            yield path, value


def leaves(tree: Tree) -> list:
    """The leaves in ``iter_leaves`` order."""
    return [leaf for _, leaf in iter_leaves(tree)]


def flatten(tree: Tree) -> dict[str, Any]:
    """Nested dict → ``{"a/b/c": leaf}`` in ``iter_leaves`` order; the inverse is ``unflatten``."""
    return dict(iter_leaves(tree))


def unflatten(flat: dict[str, Any]) -> Tree:
    """``{"a/b/c": leaf}`` → nested dict, in the order the paths come."""
    tree: Tree = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key
