"""The CPU proxy of the BSDS500 recipe runs end to end and reports what it promises."""

import numpy as np
from PIL import Image

from examples.cpu_proxy import main


def _photos(folder, rng, n):
    folder.mkdir(parents=True)
    for i in range(n):  # shrunk ×4 by the proxy: at least 64² must remain
        arr = rng.integers(0, 256, (264, 280 + 8 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.jpg")


def test_cpu_proxy_reports_curve_mask_ratios_and_thumbnail(tmp_path, rng):
    _photos(tmp_path / "train", rng, 6)
    _photos(tmp_path / "val", rng, 3)
    r = main("smoke", {"steps": 4, "train": {"batch_size": 2}}, tmp_path, tmp_path / "saved")
    assert len(r["val_psnr_curve"]) == 4 and all(np.isfinite(r["val_psnr_curve"]))
    assert set(r["by_mask_ratio"]) == {0.0, 0.02, 0.1, 0.5}
    assert r["by_mask_ratio"][0.0] == r["val_psnr_curve"][-1]  # r = 0 is the plain evaluation
    assert 5 < r["thumbnail_psnr"] < 60 and np.isfinite(r["rec"])
    # Stage 2 from the saved parameters: the encoder starts where the first run ended
    r2 = main("s2", {"steps": 2, "init": "smoke", "train": {"batch_size": 2, "stage": 2}},
              tmp_path, tmp_path / "saved")
    a, b = (np.load(tmp_path / "saved" / f"{n}.npz") for n in ("smoke", "s2"))
    enc = [k for k in a.files if k.startswith("encoder/")]
    assert enc and all(np.array_equal(a[k], b[k]) for k in enc)  # frozen in Stage 2
    assert any(not np.array_equal(a[k], b[k]) for k in a.files if k.startswith("decoder/"))
    assert np.isfinite(r2["val_psnr_curve"]).all()


def test_quality_table_collects_the_recipe_reports(tmp_path, capsys):
    import json

    from examples.quality_table import main as table

    def report(folder, psnr, by_r=None):
        folder.mkdir(parents=True)
        r = {"images": 100, "latent_values": 4096,
             "tokenizer": {"psnr": psnr, "ssim": 0.3},
             "thumbnail": {"side": 37, "values": 4107, "psnr": 22.07, "ssim": 0.476},
             "latents": {"std": 4.2, "dead_dim_fraction": 0.0}}
        if by_r:
            r["psnr_by_mask_ratio"] = by_r
        (folder / "eval.json").write_text(json.dumps(r))

    assert table(str(tmp_path)) == 1  # nothing to collect
    report(tmp_path / "full/stage2/eval", 17.36, {"0.1": 18.5})
    report(tmp_path / "plain_ae/stage1/eval", 22.5)
    assert table(str(tmp_path)) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("|")]
    assert "PSNR at r = 0.1" in rows[0]
    assert rows[2].startswith("| thumbnail 37×37") and "22.07" in rows[2]
    assert "17.36" in rows[3] and "18.50" in rows[3]
    assert "22.50" in rows[4] and "| – |" in rows[4]  # no mask-ratio report for this one
