"""A small stand-in for Marble's host side (``marble.marblemain``), faithful to MARBLE_PROTOCOL.md.

It reproduces what a learning paradigm sees, and only that:

- ``register_learning_paradigm_type`` / ``Brain.load_paradigm(name_or_cls, config)``:
  ``cls(dict(config or {}))``, and ``cls()`` if that raises;
- a ``Wanderer`` whose constructor calls, for each active paradigm, ``on_wanderer`` then
  ``on_init``; ``reapply_paradigms()`` calls ``on_wanderer`` again, as Marble's training
  helpers do;
- ``walk()``: ``before_walk``; per step a forward through the current neuron,
  ``_global_step_counter += 1``, then ``on_step`` (at a dead end ``syn=None,
  direction="none"``, and the walk ends); then the walk's own backward pass and SGD step
  on the visited neurons, ``_walk_counter += 1``, and ``on_walk_end(w, stats)``;
- the Wanderer's own random choices (start neuron, next synapse) come from ``w.rng``;
- exceptions from hooks are swallowed the way Marble does: each hook call in its own
  ``try`` except ``before_walk`` and the dead-end ``on_step``, where one ``try`` covers the
  loop over paradigms, so a failing paradigm skips the ones after it;
- ``report(group, item, data, *subgroups)`` stores ``data`` at ``group/subgroups.../item``,
  merging a dict onto an existing dict;
- a ``Brain`` built by the real host's rules (MARBLE_PROTOCOL.md, "Building a Brain"): an
  occupancy mask (a Mandelbrot-shaped region for ``n = 2``) whose indices
  ``available_indices()`` lists, ``ValueError`` outside it, ``RuntimeError`` for a neuron
  after the first created without ``connect_to``, and that neuron's synapse running from
  it to ``connect_to``; a walk from a neuron without an outgoing synapse takes 0 steps;
- the host's own tqdm bar during ``walk`` (silenced by ``TQDM_DISABLE=1``, as in Marble).

``installed()`` puts this module in ``sys.modules`` as ``marble`` and ``marble.marblemain``.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import sys
import types

import torch
from tqdm import tqdm

_PARADIGM_TYPES: dict = {}


def register_learning_paradigm_type(name: str, plugin) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("Learning paradigm type name must be a non-empty string")
    _PARADIGM_TYPES[name] = plugin


class Reporter:
    """Nested dicts: ``report("a", "x", {...}, "b")`` stores at ``tree["a"]["b"]["x"]``."""

    def __init__(self):
        self.tree: dict = {}
        self.calls = 0

    def report(self, group: str, item: str, data, *subgroups: str) -> None:
        self.calls += 1
        node = self.tree.setdefault(group, {})
        for sub in subgroups:
            node = node.setdefault(sub, {})
        if isinstance(data, dict) and isinstance(node.get(item), dict):
            node[item].update(data)
        else:
            node[item] = dict(data) if isinstance(data, dict) else data

    def get(self, *path):
        node = self.tree
        for part in path:
            node = node[part]
        return node


REPORTER = Reporter()


def report(group: str, item: str, data, *subgroups: str) -> None:
    REPORTER.report(group, item, data, *subgroups)


class Neuron:
    """out = tanh(weight · x + bias), x the carried value or the neuron's own tensor."""

    def __init__(self, tensor=0.0):
        self.tensor = torch.as_tensor(tensor, dtype=torch.float32).reshape(-1)
        self.weight, self.bias = 1.0, 0.0
        self.outgoing: list = []
        self.incoming: list = []

    def forward(self, x):
        x = self.tensor if x is None else x
        return torch.tanh(x * self.weight + self.bias)


DIRECTIONS = ("uni", "bi")


class Synapse:
    def __init__(self, source: Neuron, target: Neuron, direction: str = "uni"):
        if direction not in DIRECTIONS:
            raise ValueError(f"synapse direction must be one of {DIRECTIONS}, not {direction!r}")
        self.source, self.target, self.direction = source, target, direction
        source.outgoing.append(self)
        target.incoming.append(self)

    def transmit(self, value, direction: str = "forward"):
        return self.target if direction == "forward" else self.source


class Brain:
    """Marble's grid brain: neurons only inside the occupancy mask, each joined on creation.

    ``size`` is the grid resolution per dimension. Index ``i`` of a dimension maps to
    ``lo + (hi − lo)·i/(size − 1)`` of its bounds (−2…1 and −1.5…1.5 for ``n = 2``), and an
    index is inside when that point is in the Mandelbrot set (``max_iters`` iterations);
    for ``n ≠ 2`` every index is inside, as in Marble.
    """

    def __init__(self, n: int = 2, *, size=None, max_iters: int = 50):
        if size is None:
            raise ValueError("this host models grid brains only: give size=")
        self.n = int(n)
        self.size = (int(size),) * self.n if isinstance(size, int) else tuple(map(int, size))
        if len(self.size) != self.n:
            raise ValueError("size must have length n")
        self.max_iters = max_iters
        self.occupancy = {
            idx: self._inside(idx) for idx in itertools.product(*(range(k) for k in self.size))
        }
        self.neurons: dict = {}
        self.synapses: list = []
        self._paradigms: list = []
        self._paradigm_disabled: set = set()

    def _inside(self, idx) -> bool:
        if self.n != 2:
            return True
        bounds = ((-2.0, 1.0), (-1.5, 1.5))
        x, y = (
            lo + (hi - lo) * i / max(k - 1, 1) if k > 1 else (lo + hi) / 2
            for i, k, (lo, hi) in zip(idx, self.size, bounds)
        )
        c, z = complex(x, y), 0j
        for _ in range(self.max_iters):
            z = z * z + c
            if abs(z) > 2.0:
                return False
        return True

    def is_inside(self, index) -> bool:
        return self.occupancy.get(tuple(int(i) for i in index), False)

    def available_indices(self) -> list:
        """Every index inside the mask, occupied or not, in row-major order."""
        return [idx for idx, inside in self.occupancy.items() if inside]

    def add_neuron(self, index, *, tensor=0.0, connect_to=None, direction: str = "uni") -> Neuron:
        """A neuron at ``index``, joined by a synapse from it to ``connect_to``."""
        idx = tuple(int(i) for i in index)
        if not self.is_inside(idx):
            raise ValueError("Neuron index is outside the brain shape")
        if idx in self.neurons:
            raise ValueError("Neuron already exists at this index")
        if self.neurons and connect_to is None:
            raise RuntimeError(
                "tried to create a neuron not connected to at least one another "
                "neuron via at least one other synapse"
            )
        if connect_to is not None and self.get_neuron(connect_to) is None:
            raise ValueError(f"connect_to {tuple(connect_to)} holds no neuron")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        self.neurons[idx] = Neuron(tensor)
        if connect_to is not None:
            self.connect(idx, connect_to, direction=direction)
        return self.neurons[idx]

    def get_neuron(self, index):
        return self.neurons.get(tuple(int(i) for i in index))

    def connect(self, src_index, dst_index, *, direction: str = "uni") -> Synapse:
        src, dst = self.get_neuron(src_index), self.get_neuron(dst_index)
        if src is None or dst is None:
            raise ValueError("Both source and target neurons must exist to connect")
        syn = Synapse(src, dst, direction)
        self.synapses.append(syn)
        return syn

    def load_paradigm(self, name, config=None):
        plug = name if isinstance(name, type) else _PARADIGM_TYPES.get(str(name))
        if plug is None:
            raise ValueError(f"Unknown learning paradigm: {name}")
        try:
            obj = plug(dict(config or {}))
        except Exception:  # noqa: BLE001 - Marble's own fallback to a no-argument plugin
            obj = plug()
        self._paradigms.append(obj)
        return obj

    def enable_paradigm(self, obj, *, enabled: bool = True) -> None:
        (self._paradigm_disabled.discard if enabled else self._paradigm_disabled.add)(id(obj))

    def active_paradigms(self) -> list:
        return [p for p in self._paradigms if id(p) not in self._paradigm_disabled]


def chain_brain(length: int, *, size=(12, 12)) -> Brain:
    """The tests' graph, built by the host's rules: c[0] → c[1] → … → c[length−1] plus skips
    c[i] → c[i+2], so a walk from c[0] branches (drawing on ``w.rng``) and ends at the dead
    end c[length−1]; ``c`` are the first ``length`` of ``available_indices()``.

    A new neuron's synapse runs from it to ``connect_to``, so the chain grows from its dead
    end backwards: each neuron joins the one after it.
    """
    brain = Brain(2, size=size)
    c = brain.available_indices()[:length]
    if len(c) < length:
        raise ValueError(f"a {size} brain has only {len(c)} indices inside its mask")
    for i in reversed(range(length)):
        v = 0.3 + 0.1 * i
        join = {"connect_to": c[i + 1], "direction": "uni"} if i + 1 < length else {}
        brain.add_neuron(c[i], tensor=[v, -v, 0.5 * v], **join)
    for i in range(length - 2):
        brain.connect(c[i], c[i + 2], direction="uni")
    return brain


def chain_start(brain: Brain) -> Neuron:
    """c[0] of ``chain_brain``: the neuron its walks start from."""
    return brain.get_neuron(brain.available_indices()[0])


class Wanderer:
    def __init__(self, brain: Brain, *, seed: int = 0, device: str = "cpu"):
        self.brain = brain
        self._device = device
        self.rng = random.Random(seed)
        self._plugin_state: dict = {}
        self._global_step_counter = 0
        self._walk_counter = 0
        self._wplugins: list = []
        self.reapply_paradigms()

    def reapply_paradigms(self) -> None:
        for paradigm in self.brain.active_paradigms():
            try:
                if hasattr(paradigm, "on_wanderer"):
                    paradigm.on_wanderer(self)
            except Exception:  # noqa: BLE001 - Marble swallows a paradigm hook's errors
                pass
            try:
                if hasattr(paradigm, "on_init"):
                    paradigm.on_init(self)
            except Exception:  # noqa: BLE001 - Marble swallows a paradigm hook's errors
                pass

    def _choices(self, n: Neuron) -> list:
        out = [(s, "forward") for s in n.outgoing if s.direction in ("uni", "bi")]
        return out + [(s, "backward") for s in n.incoming if s.direction == "bi"]

    def walk(self, *, max_steps: int = 10, start: Neuron | None = None, lr: float = 1e-2) -> dict:
        if start is None:
            nodes = list(self.brain.neurons.values())
            start = nodes[self.rng.randrange(len(nodes))] if nodes else None
        current = start
        if current is None:
            return {"loss": 0.0, "steps": 0, "visited": 0}
        params = {}  # id(neuron) → (w, b), the walk's own leaves
        outputs, visited, step_metrics = [], [], []
        try:
            for paradigm in self.brain.active_paradigms():
                if hasattr(paradigm, "before_walk"):
                    paradigm.before_walk(self, current)
        except Exception:  # noqa: BLE001 - Marble swallows a paradigm hook's errors
            pass
        steps, carried = 0, None
        bar = tqdm(total=max_steps, desc="walk", leave=False)  # Marble's own bar
        while steps < max_steps and current is not None:
            visited.append(current)
            if id(current) not in params:
                params[id(current)] = (
                    torch.tensor(float(current.weight), requires_grad=True),
                    torch.tensor(float(current.bias), requires_grad=True),
                )
            w, b = params[id(current)]
            x = current.tensor if carried is None else carried
            out = torch.tanh(x * w + b)
            outputs.append(out)
            step_metrics.append({"loss": float((out.detach() ** 2).mean())})
            self._global_step_counter += 1
            choices = self._choices(current)
            if not choices:
                try:
                    for paradigm in self.brain.active_paradigms():
                        if hasattr(paradigm, "on_step"):
                            paradigm.on_step(self, current, None, "none", steps, out)
                except Exception:  # noqa: BLE001 - Marble swallows a paradigm hook's errors
                    pass
                choices = self._choices(current)  # a plugin may have grown the graph
                if not choices:
                    break
            syn, direction = self.rng.choice(choices)
            nxt = syn.transmit(out, direction)
            for paradigm in self.brain.active_paradigms():
                try:
                    if hasattr(paradigm, "on_step"):
                        paradigm.on_step(self, current, syn, direction, steps, out)
                except Exception:  # noqa: BLE001 - Marble swallows a paradigm hook's errors
                    pass
            current, carried, steps = nxt, out, steps + 1
            bar.update(1)
        bar.close()
        loss = sum((o**2).mean() for o in outputs)
        loss.backward()
        with torch.no_grad():
            for n in visited:
                w, b = params[id(n)]
                n.weight = float(w - lr * w.grad)
                n.bias = float(b - lr * b.grad)
        self._walk_counter += 1
        stats = {
            "loss": float(loss.detach()),
            "steps": steps,
            "visited": len(visited),
            "step_metrics": step_metrics,
        }
        for paradigm in self.brain.active_paradigms():
            try:
                if hasattr(paradigm, "on_walk_end"):
                    paradigm.on_walk_end(self, stats)
            except Exception:  # noqa: BLE001 - Marble swallows a paradigm hook's errors
                pass
        return stats


def module() -> types.ModuleType:
    """This host as a ``marble.marblemain`` module object."""
    return sys.modules[__name__]


@contextlib.contextmanager
def installed():
    """``import marble.marblemain`` yields this module inside the block (a fresh reporter)."""
    global REPORTER
    saved = {k: sys.modules.get(k) for k in ("marble", "marble.marblemain")}
    pkg = types.ModuleType("marble")
    pkg.__path__ = []
    pkg.marblemain = module()
    sys.modules["marble"], sys.modules["marble.marblemain"] = pkg, module()
    REPORTER = Reporter()
    try:
        yield module()
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
