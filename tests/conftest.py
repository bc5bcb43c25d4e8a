"""Shared fixtures: a tiny synthetic data set in the official layout, decoded small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from isic_utils.data import load_report_data
from isic_utils.synthetic import make_synthetic_isic

SAMPLE_DIR = os.environ.get("ISIC_SAMPLE_DIR")
WEIGHTS = os.environ.get("ISIC_ENCODER_WEIGHTS")


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch, request):
    """Unit tests never depend on $ISIC_ENCODER_WEIGHTS unless they ask for it (real_data marker)."""
    if "real_data" not in request.keywords:
        monkeypatch.delenv("ISIC_ENCODER_WEIGHTS", raising=False)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_isic(tmp_path_factory.mktemp("synthetic"), n_train=20, n_test=6, seed=0)


@pytest.fixture(scope="session")
def tiny_data(synthetic_root, tmp_path_factory):
    return load_report_data(synthetic_root, image_size=64, val_fraction=0.2, seed=0,
                            cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def requires(variable: str):
    return pytest.mark.skipif(not os.environ.get(variable), reason=f"{variable} is not set")
