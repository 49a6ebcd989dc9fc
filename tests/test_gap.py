"""The domain-gap check on two cases with known answers."""

import numpy as np
from PIL import Image

from fusionnet.cli.main import main
from fusionnet.workflows.gap import GapSettings, gap_check


def _photos(root, n, seed, invert=False):
    """Random crops of scikit-learn's two real photos, one class each, optionally colour-inverted."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    for c, photo in zip(("a", "b"), load_sample_images().images):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            y, x = rng.integers(0, photo.shape[0] - 120), rng.integers(0, photo.shape[1] - 160)
            crop = photo[y:y + 120, x:x + 160]
            Image.fromarray(255 - crop if invert else crop).resize((64, 48)).save(root / c / f"{seed}_{i}.png")
    return root


def test_two_halves_of_one_folder_are_indistinguishable(tmp_path):
    a = _photos(tmp_path / "a", 30, seed=0)
    b = _photos(tmp_path / "b", 30, seed=1)
    r = gap_check(a, b, GapSettings(size=64, max_images=60))
    assert r["domain_auc"] < 0.7 and not any("colour" in c for c in r["causes"])


def test_a_colour_inverted_copy_is_told_apart_and_colour_is_named(tmp_path, capsys):
    a = _photos(tmp_path / "a", 30, seed=0)
    b = _photos(tmp_path / "b", 30, seed=0, invert=True)
    b_means = gap_check(a, b, GapSettings(size=64, max_images=60))
    assert b_means["domain_auc"] > 0.75 and any(c.startswith("colour") for c in b_means["causes"])
    assert main(["gap", "--train", str(a), "--test", str(b), "--size", "64", "--out", str(tmp_path / "gap")]) == 0
    assert {"gap.json", "gap.md", "gap.png"} <= {p.name for p in (tmp_path / "gap").iterdir()}
    assert "Domain classifier AUC" in capsys.readouterr().out


def test_a_few_odd_files_are_not_a_cause_and_the_sample_is_stated(tmp_path):
    """Two GIFs among many PNGs do not make 'file format' a likely cause; the report says what it sampled."""
    from fusionnet.workflows.gap import gap_markdown

    a = _photos(tmp_path / "a", 30, seed=0)
    b = _photos(tmp_path / "b", 30, seed=1)
    for i, png in enumerate(sorted((b / "a").glob("*.png"))[:2]):
        Image.open(png).save(png.with_suffix(".gif"))
        png.unlink()
    r = gap_check(a, b, GapSettings(size=64, max_images=40))
    assert not any(c.startswith("file format") for c in r["causes"])
    assert r["images"]["train"] == {"sampled": 40, "found": 60}
    text = gap_markdown(r)
    assert "train: 40 of 60 images (an even sample)" in text
    # an AUC at chance: whatever the pixel statistics differ in is reported as unlikely to explain a gap
    low = gap_markdown({**r, "domain_auc": 0.43, "causes": ["brightness: mean luminance 0.40 vs 0.52"]})
    assert "indistinguishable" in low and "unlikely to explain" in low and "Likely causes" not in low
    high = gap_markdown({**r, "domain_auc": 0.9, "causes": ["brightness: mean luminance 0.40 vs 0.52"]})
    assert "Likely causes:" in high
