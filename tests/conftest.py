"""Shared fixtures. `demo_dev_set`: a small procedural dev set (data_prep.make_demo) built once per session.

It lives in a temporary folder that is not named data/ (TMP/elsewhereN/dev_set), so its metadata paths, which
have the official form 'data/dev_set/...', resolve only through the dev-set folder the code is given or finds
from the metadata's location, never through the current directory.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data_prep  # noqa: E402


@pytest.fixture(scope="session")
def demo_dev_set(tmp_path_factory):
    """Path of a small demo dev_set: 18 classes x 3 train files, 2 + 1 rooms, 4 validation and 4 test mixtures."""
    config = data_prep.DemoConfig(files_per_class=3, num_rooms=2, rir_length=2048, valid_mixtures=4, test_mixtures=4)
    return data_prep.make_demo(tmp_path_factory.mktemp("elsewhere"), config)


@pytest.fixture(scope="session")
def demo_dev_set_2025(tmp_path_factory):
    """The same in the 2025 layout: SpatialScaper metadata with ref_event, test/, class files directly in <Label>/."""
    config = data_prep.DemoConfig(year=2025, files_per_class=3, num_rooms=2, rir_length=2048, valid_mixtures=4,
                                  test_mixtures=4)
    return data_prep.make_demo(tmp_path_factory.mktemp("elsewhere"), config)
