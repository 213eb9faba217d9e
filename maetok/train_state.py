"""The train state, described once for every backend (docs/design.md §7).

Both backends (``maetok_jax/train.py``, ``maetok_torch/train.py``) hold the same tree, and
a checkpoint stores it flat under ``/``-joined keys::

    {"step": int32, "params": {"encoder", "decoder", "aux"}, "opt": {"count", "mu", "nu"},
     "ema": {...}?, "disc": {...}?, "disc_opt": {"count", "mu", "nu"}?,
     "lecam": {"real", "fake"}?}

The state follows the stage: optimiser moments and EMA cover only the groups the stage
trains (``trainable_keys``), so in Stage 2 the frozen encoder and the unused auxiliary
decoders have parameters and nothing else. ``nu`` is absent for SGD, ``ema`` when
``train.ema_decay`` is 0, the discriminator entries without ``loss.use_adv``.

``expected_layout`` derives a checkpoint's keys, shapes and dtypes from the parameter spec
alone (no model is initialised); ``start_stage2`` is the one way a stage starts from the
weights of the run before it.
"""

from __future__ import annotations

from maetok.config import Config
from maetok.params import spec_disc, spec_params
from maetok.tree import Tree, flatten, map_tree

STAGE_GROUPS = {1: ("encoder", "decoder", "aux"), 2: ("decoder",)}
# kept from the previous state when a stage starts (the rest starts afresh)
CARRIED = ("params", "disc", "lecam")
_INT32 = ((), "int32")  # a layout entry: (shape, dtype name)


def trainable_keys(stage: int) -> tuple[str, ...]:
    """Top-level parameter groups that ``stage`` updates (and keeps moments and EMA of)."""
    return STAGE_GROUPS[stage]


def _opt_layout(tree: Tree, cfg: Config) -> Tree:
    opt = {"count": _INT32, "mu": tree}
    return opt if cfg.train.optimizer == "sgd" else {**opt, "nu": tree}


def expected_layout(cfg: Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Flat key → (shape, dtype name) that a train-state checkpoint of ``cfg`` has exactly.

    Read off the ``ParamSpec`` trees: parameters, moments and EMA are float32, the step and
    the optimiser counts int32.
    """
    params = map_tree(lambda s: (s.shape, "float32"), spec_params(cfg.model))
    trainable = {k: params[k] for k in trainable_keys(cfg.train.stage)}
    tree = {"step": _INT32, "params": params, "opt": _opt_layout(trainable, cfg)}
    if cfg.train.ema_decay > 0:
        tree["ema"] = trainable
    if cfg.loss.use_adv:
        disc = map_tree(lambda s: (s.shape, "float32"), spec_disc(cfg.model))
        tree.update(
            disc=disc,
            disc_opt=_opt_layout(disc, cfg),
            lecam={"real": ((), "float32"), "fake": ((), "float32")},
        )
    return flatten(tree)


def ema_params(tree: dict) -> dict:
    """The tokenizer's EMA parameters from a state tree: the EMA of the groups the stage
    trained, the parameters of the frozen ones (which do not change, so have no EMA)."""
    return {**tree["params"], **tree["ema"]}


def start_stage2(backend, previous: dict, cfg: Config):
    """The first state of ``cfg``'s stage, from the numpy state tree of the run before it.

    The one Stage-2 start: ``maetok train --init-from`` (of either stage) and the Marble
    plugin's switch both call it. Kept: the tokenizer parameters, and, when ``cfg`` trains
    with the discriminator and ``previous`` has one, the discriminator and its LeCAM
    statistics. Started afresh: the step (0, so the learning-rate warm-up and the mask
    anneal begin again), both optimisers (moments of the new trainable groups only) and the
    EMA, which restarts at the parameters. ``previous`` may be a whole state or just
    ``{"params": ...}``; its optimiser and EMA entries, of any layout, are not read.
    """
    tree = backend.state_to_numpy(backend.init_state(cfg.train.seed, previous["params"]))
    for key in CARRIED:
        if key in tree and key in previous:
            tree[key] = previous[key]
    return backend.state_from_numpy(tree)
