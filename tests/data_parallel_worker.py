"""The N-way side of ``tests/test_data_parallel.py``, run in its own process(es).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/data_parallel_worker.py jax OUT
    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/data_parallel_worker.py torch OUT

It trains ``STEPS`` steps from ``initial_tree()`` through the Backend API (JAX: on a mesh of
every device, then with the state sharded FSDP-style; torch: one rank of the process
group), and a short run through ``maetok.trainer.train``. The writer process saves the
metrics and final states under OUT for the test to compare with one device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maetok.config import preset
from maetok.data import BatchSource
from maetok.params import init_disc
from maetok.synthetic import SyntheticImages
from maetok.tree import flatten

STEPS = 3
# The adversarial loss with its adaptive weight and LeCAM on from step 0, so every
# quantity that pools the batch (mask count, adaptive weight, LeCAM EMAs) is exercised.
CFG = preset("tiny").replace(
    train={
        "batch_size": 8,
        "steps": STEPS,
        "log_every": 1,
        "ckpt_every": 1000,
        "sample_every": 1000,
    },
    loss={"use_adv": True, "adaptive_weight": True, "disc_start": 0},
)
# For the trainer runs the discriminator stays off (same compiled program): at
# initialisation its output-bias gradient cancels analytically and is fp32 noise.
TRAINER_CFG = CFG.replace(loss={"disc_start": 100})


def dataset(cfg=CFG):
    return SyntheticImages(cfg.model.image_size, count=32, seed=cfg.train.seed)


def initial_tree(backend) -> dict:
    """The numpy train state both sides start from (discriminator bias off the margin)."""
    from maetok_parity.harness import disc_off_margin  # imports both backends

    tree = backend.state_to_numpy(backend.init_state(CFG.train.seed))
    first = BatchSource(dataset(), CFG).batch(0)["images"]
    tree["disc"] = disc_off_margin(init_disc(CFG, CFG.train.seed), first, CFG.model)
    return tree


def run_steps(backend, steps: int = STEPS):
    """``steps`` steps through ``backend`` → (per-step metrics, final numpy state)."""
    source = BatchSource(dataset(), CFG, rows=backend.rows)
    state = backend.state_from_numpy(initial_tree(backend))
    history = []
    for s in range(steps):
        state, metrics = backend.train_step(state, source.batch(s), s)
        history.append(backend.metrics_to_host(metrics))
    return history, backend.state_to_numpy(state), state


def save(out: Path, name: str, history, tree) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(history))
    np.savez(out / f"{name}.npz", **flatten(tree))


def main(which: str, out: Path) -> int:
    from maetok.trainer import train

    if which == "jax":
        import jax

        from maetok_jax.backend import Backend

        n = jax.device_count()
        for name, fsdp in (("nway", False), ("fsdp", True)):
            backend = Backend(CFG, devices=n, shard_params=fsdp)
            history, tree, state = run_steps(backend)
            leaves = jax.tree_util.tree_leaves(state)
            sharded = sum(not x.sharding.is_fully_replicated for x in leaves)
            save(out, name, history, tree)
            (out / f"{name}_info.json").write_text(
                json.dumps(
                    {
                        "devices": n,
                        "sharded_leaves": sharded,
                        "leaves": len(leaves),
                        "describe": backend.describe(),
                    }
                )
            )
        train(TRAINER_CFG, dataset(), out / "run", "jax", progress=False)
        return 0
    from maetok_torch.backend import Backend

    backend = Backend(CFG, devices=Backend.default_devices())
    history, tree, _ = run_steps(backend)
    if backend.is_writer:
        save(out, "nway", history, tree)
        (out / "nway_info.json").write_text(
            json.dumps({"devices": backend.dist.world, "describe": backend.describe()})
        )
    train(TRAINER_CFG, dataset(), out / "run", "torch", progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
