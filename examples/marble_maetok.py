"""Train the MAETok tokenizer inside Marble: one tokenizer iteration per Wanderer step.

    python examples/marble_maetok.py                 # in a Marble installation
    python examples/marble_maetok.py --host test     # under tests/marble_host.py (no Marble)

The script registers the paradigm, builds a small Brain the way Marble requires (see
``build_brain``), loads the paradigm with ``brain.load_paradigm("maetok", {...})``, walks
a few times with a Wanderer, and prints after each walk the steps it took and the tokenizer
iterations they ran (one per step, and one more when a walk ends at a dead end), then what
the paradigm reported (``training/maetok``, ``maetok/tokens``, ``maetok/aux``). Marble's own
per-walk progress bars are off (``TQDM_DISABLE=1`` unless already set), so they do not bury
these lines. With ``--save PATH`` the tokenizer is written in the project's checkpoint
format, for ``maetok reconstruct --checkpoint PATH`` or the JAX backend. Without Marble
(and without ``--host test``) it says how to get Marble and exits with status 0. The exit
status is 1 when the walks did not train one iteration per step.
"""

from __future__ import annotations

import os

# Read by tqdm when it is imported, so before Marble (or anything else) imports it.
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))

BRAIN_SIZE = (16, 16)  # grid resolution; Marble's default mask keeps 36 of these 256 indices


def marble_host(kind: str):
    """A context manager yielding ``marble.marblemain`` (or None when Marble is missing)."""
    if kind == "test":
        from tests import marble_host as host

        return host.installed()
    try:
        import marble.marblemain as marblemain
    except ImportError as e:
        print(
            f"Marble is not available ({e}).\n"
            "Marble is not on the package index: clone its repository (the one providing "
            "marble/marblemain.py, github.com/FreddyE1982/_marble at the time of writing), "
            "run `pip install -e .` inside it (or put it on PYTHONPATH), and run this script "
            "again; `--host test` runs the same flow under the test suite's stand-in host."
        )
        return None
    return contextlib.nullcontext(marblemain)


def build_brain(marblemain, neurons: int):
    """A chain of ``neurons`` neurons that walks travel both ways; returns (brain, indices).

    Marble places neurons only inside the brain's occupancy mask, whose indices
    ``available_indices()`` lists, and every neuron after the first must join the graph as
    it is created: ``connect_to`` names a neuron already there, and the synapse runs from
    the new neuron to it. A ``"uni"`` chain built this way points back at its first neuron,
    so a walk starting there has nowhere to go; ``"bi"`` synapses carry a walk either way,
    so each walk goes on for its ``max_steps``.
    """
    brain = marblemain.Brain(2, size=BRAIN_SIZE)
    chain = list(brain.available_indices())[:neurons]
    if len(chain) < neurons:
        raise SystemExit(
            f"only {len(chain)} indices of a {BRAIN_SIZE} brain are usable; ask for fewer --neurons"
        )
    brain.add_neuron(chain[0], tensor=[0.1])
    for i in range(1, neurons):
        brain.add_neuron(chain[i], tensor=[0.1 * (i + 1)], connect_to=chain[i - 1], direction="bi")
    return brain, chain


def fmt(d: dict, keys) -> str:
    return "  ".join(f"{k}={d[k]:.4g}" for k in keys if isinstance(d.get(k), (int, float)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", choices=("marble", "test"), default="marble")
    ap.add_argument("--walks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="max_steps of each walk")
    ap.add_argument("--neurons", type=int, default=6, help="length of the neuron chain")
    ap.add_argument("--stage2-start", type=int, default=20, help="iteration of the Stage-2 switch")
    ap.add_argument("--save", help="write the trained tokenizer to this checkpoint")
    args = ap.parse_args(argv)

    ctx = marble_host(args.host)
    if ctx is None:
        return 0
    from maetok_marble import register

    with ctx as marblemain:
        register()  # MAETokParadigm under "maetok"
        brain, chain = build_brain(marblemain, args.neurons)
        tok = brain.load_paradigm(
            "maetok",
            {
                "preset": "tiny",
                "train.batch_size": 8,
                "train.lr": 2e-3,
                "train.warmup_steps": 5,
                "stage2_start": args.stage2_start,
                "train.anneal_steps": 20,
                "pretrain_steps": 4,
                "stats_every": 5,
            },
        )
        w = marblemain.Wanderer(brain, seed=0)  # on_wanderer, on_init: the state is built
        if tok.stopped:  # e.g. a rejected config: the host fell back to cls()
            print(f"the maetok paradigm is stopped: {tok.last_error}")
            return 1
        print(
            f"brain: {len(chain)} neurons from {chain[0]} to {chain[-1]}, joined by 'bi' "
            f"synapses; walks start at {chain[0]}"
        )
        print(
            f"maetok paradigm on {tok.summary()['device']}: "
            f"{tok.settings.source.description}, stage 2 from iteration {args.stage2_start}"
        )
        seen, steps, calls, iterations = 0, 0, 0, 0
        for k in range(args.walks):
            stats = w.walk(max_steps=args.steps, start=brain.get_neuron(chain[0]), lr=1e-2)
            new = [r for r in tok.history if r["iteration"] >= seen]
            seen = tok.iteration
            walked = [r for r in new if not r["pretrain"]]
            pre, dead = len(new) - len(walked), sum(r["dead_end"] for r in walked)
            steps, calls, iterations = (
                steps + stats["steps"],
                calls + stats["steps"] + dead,
                iterations + len(walked),
            )
            mean = {
                key: sum(r[key] for r in walked) / len(walked)
                for key in ("loss", "rec", "mask_ratio")
                if walked
            }
            print(
                f"walk {k + 1}: {stats['steps']} steps"
                + (" + dead end" if dead else "")
                + f" -> {len(walked)} tokenizer iterations"
                + (f" (after {pre} pretraining)" if pre else "")
                + f", stage {tok.stage} | host loss {stats['loss']:.4f} | maetok "
                + fmt(mean, mean)
            )
            if stats["steps"] == 0:
                print(f"  the walk took no step: {chain[0]} has no synapse to follow")
        last = tok.history[-1] if tok.history else {}
        print(
            "training/maetok (last):",
            fmt(
                last,
                ("iteration", "stage", "loss", "rec", "percep", "lr", "mask_ratio", "grad_norm"),
            ),
        )
        tokens = tok.token_stats(tok.settings.source.batch(0))
        print(
            "maetok/tokens:",
            fmt(tokens, ("mean", "std", "token_var_mean", "token_usage", "collapse")),
        )
        aux = [r for r in tok.history if "aux/hog" in r]
        if aux:
            print(
                "maetok/aux (last stage-1 iteration):",
                fmt(
                    {k[4:]: v for k, v in aux[-1].items() if k.startswith("aux/")},
                    ("hog", "conv", "pixel"),
                ),
            )
        reporter = getattr(marblemain, "REPORTER", None)
        if args.host == "test" and reporter is not None:
            paths = sorted(f"{g}/{sub}" for g, items in reporter.tree.items() for sub in items)
            print("reported paths:", ", ".join(paths))
        print(
            f"errors: {tok.error_count}"
            + (f" (last: {tok.last_error.splitlines()[0]})" if tok.last_error else "")
        )
        print(
            f"{args.walks} walks: {steps} steps, {iterations} tokenizer iterations"
            + (f" ({calls - steps} of them at dead ends)" if calls > steps else "")
        )
        if args.save:
            print(f"saved {tok.save(args.save)} (stage {tok.stage}, iteration {tok.iteration})")
    per_step = iterations == calls and steps >= args.walks
    return 0 if per_step and not tok.error_count else 1


if __name__ == "__main__":
    sys.exit(main())
