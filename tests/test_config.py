"""Config: presets, JSON round trip, and a clear message for every impossible value."""

import pytest

from maetok.config import (
    PRESETS,
    Config,
    LossConfig,
    ModelConfig,
    TrainConfig,
    compute_only,
    preset,
)
from maetok.errors import ConfigError
from maetok.masks import mask_for_step, sample_mask
from maetok.params import count, init_params


@pytest.mark.parametrize("name", ["tiny", "seed", "base"])
def test_presets_round_trip_through_json(name):
    cfg = preset(name)
    again = Config.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)


def test_preset_sizes_follow_the_spec():
    base = preset("base").model
    assert (base.enc_width, base.enc_depth, base.enc_heads) == (768, 12, 12)
    assert base.num_patches == 256 and base.num_latent_tokens == 128
    assert 19e6 < count(init_params(preset("seed"), 0)) < 22e6  # seed: ~20.6 M parameters


# What `seed` has always been: the fields that shape it and how it trains.
SEED = {
    "model": dict(
        image_size=256,
        channels=3,
        patch_size=16,
        num_latent_tokens=128,
        latent_dim=32,
        enc_width=256,
        enc_depth=12,
        enc_heads=8,
        dec_width=256,
        dec_depth=8,
        dec_heads=8,
        mlp_ratio=4,
        aux_targets=("hog", "conv", "pixel"),
        aux_kind="vit",
        aux_width=192,
        aux_depth=3,
        aux_heads=3,
        disc_width=64,
        disc_depth=3,
        compute_dtype="float32",
        attention="plain",
        query_pos=False,
    ),
    "train": dict(stage=1, batch_size=32, lr=3e-4, warmup_steps=200, optimizer="adamw"),
}


def test_seed_preset_is_what_it_was():
    cfg = preset("seed")
    for section, fields in SEED.items():
        got = {k: getattr(getattr(cfg, section), k) for k in fields}
        assert got == fields, section


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_list_only_what_differs_from_the_defaults(name):
    defaults = {"model": ModelConfig(), "loss": LossConfig(), "train": TrainConfig()}
    same = [
        f"{section}.{k}"
        for section, fields in PRESETS[name].items()
        for k, v in fields.items()
        if getattr(defaults[section], k) == v
    ]
    assert same == [], f"preset {name} restates defaults: {same}"


def test_compute_only_fields_are_marked_on_the_fields():
    assert compute_only(ModelConfig) == {
        "compute_dtype",
        "attention",
        "unroll",
        "remat",
        "lowp_norm",
        "split_qkv",
        "fast_filters",
        "stack_aux",
        "compile_scope",
    }
    assert compute_only(TrainConfig()) == {
        "log_every",
        "ckpt_every",
        "sample_every",
        "deterministic",
    }
    assert compute_only(LossConfig) == frozenset()


@pytest.mark.parametrize(
    "section,changes,needle",
    [
        ("model", {"patch_size": 5}, "not divisible"),
        ("model", {"enc_heads": 5}, "does not divide"),
        ("model", {"dec_width": 72, "dec_heads": 4}, "multiple of 4"),
        ("model", {"aux_targets": ["hog", "sift"]}, "unknown auxiliary target"),
        ("model", {"compute_dtype": "float16"}, "compute_dtype"),
        ("model", {"enc_width": 0}, "positive"),
        ("train", {"mask_min": -0.1}, "mask_min"),
        ("train", {"mask_max": 1.2}, "mask_max"),
        ("train", {"mask_min": 0.7, "mask_max": 0.6}, "larger than"),
        ("train", {"anneal_start": 2.0}, "anneal_start"),
        ("train", {"optimizer": "lamb"}, "optimizer"),
        ("train", {"steps": 1.5}, "integer"),
        ("train", {"stage": 3}, "stage"),
        ("loss", {"gamma": {"sift": 1.0}}, "gamma"),
        ("loss", {"rec": "huber"}, "loss.rec"),
    ],
)
def test_impossible_values_are_rejected_by_name(section, changes, needle):
    with pytest.raises(ConfigError, match=needle):
        preset("tiny", **{section: changes})


def test_unknown_preset_and_unknown_field():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown model option"):
        preset("tiny", model={"widht": 3})


def test_hog_needs_patches_made_of_cells():
    with pytest.raises(ConfigError, match="HOG"):
        preset("tiny", model={"image_size": 36, "patch_size": 12})
    ok = preset("tiny", model={"image_size": 36, "patch_size": 12, "aux_targets": ["pixel"]})
    assert ok.model.aux_targets == ("pixel",)


def test_masks_are_a_pure_function_of_seed_and_step():
    t = preset("tiny").train
    a, ra = mask_for_step(5, t, 64)
    b, rb = mask_for_step(5, t, 64)
    c, rc = mask_for_step(6, t, 64)
    assert (a == b).all() and ra == rb and (a != c).any() and ra != rc
    assert 0.4 <= ra <= 0.6 and a.shape == (t.batch_size, 64)
    exact = sample_mask(0, 1, 4, 64, 0.45, "exact")
    assert (exact.sum(1) == 29).all()  # ceil(64·0.45)
    many = sample_mask(0, 2, 64, 64, 0.5)
    assert abs(many.mean() - 0.5) < 0.05
