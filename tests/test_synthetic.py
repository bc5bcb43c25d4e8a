import hashlib

from isic_utils.data.eda import original_sizes
from isic_utils.data.sources import find_pairs
from isic_utils.data.synthetic import make_synthetic_isic


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("ISIC_*")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_in_the_official_layout(tmp_path):
    a = make_synthetic_isic(tmp_path / "a", n_train=2, n_test=1, seed=0)
    b = make_synthetic_isic(tmp_path / "b", n_train=2, n_test=1, seed=0)
    assert digest(a) == digest(b)
    assert len(find_pairs(a, "train")) == 2 and len(find_pairs(a, "test")) == 1
    assert digest(make_synthetic_isic(tmp_path / "c", n_train=2, n_test=1, seed=1)) != digest(a)


def test_sizes_vary(synthetic_root):
    sizes = original_sizes(find_pairs(synthetic_root, "train"))
    assert sizes["width"].between(600, 1500).all() and sizes["width"].nunique() > 10
