"""Shared fixtures for rarefly's tests.

Fixtures built once per test session, from the files the project ships in
``driver/rarefly/data`` (the embedded foundation model and its GFN2-xTB data):

``model_file``
    Path of a rarefly model file (``.rfly``): a ``lastlayer`` posterior on the embedded
    foundation model (``build_posterior("small", "lastlayer", ...)``), fitted on 20 frames
    spread over ``foundation_train.xyz`` and calibrated on 10 of ``foundation_valid.xyz``. No energy offset is fitted: the data are the
    foundation's own reference (GFN2-xTB). Read-only: copy it before changing it.
    Building it takes a few seconds to half a minute on 2 cores, once per session.

``ethanol_xyz``
    Path of the shipped ethanol molecule (``driver/rarefly/data/ethanol.xyz``, extxyz,
    non-periodic): the demo system, usable as ``--template``.

``training_frames``
    The 20 :class:`rarefly.posterior.LabelledFrame` used for ``model_file``.

``child_env``
    Environment for subprocesses (i-PI, ``rarefly driver``): one torch/OpenMP thread,
    because the test machines have two cores that other processes share. (This file also
    sets ``OMP_NUM_THREADS=1`` for the test process itself unless it is already set.)

Tests that need the shipped files are skipped, with the reason, when they are absent.
"""

from __future__ import annotations

import os

import pytest

N_FIT_FRAMES = 20

# Two shared cores: torch (imported later, by the tests) and every subprocess use one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def _data_dir():
    from rarefly.foundation import DATA_DIR

    return DATA_DIR


def _require(path):
    if not path.exists():
        pytest.skip(f"{path} is missing (regenerate with scripts/make_foundation.py)")
    return path


@pytest.fixture(scope="session")
def ethanol_xyz():
    return _require(_data_dir() / "ethanol.xyz")


@pytest.fixture(scope="session")
def training_frames():
    from rarefly.demo import select_frames

    return select_frames(_require(_data_dir() / "foundation_train.xyz"), N_FIT_FRAMES)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, training_frames):
    from rarefly.foundation import EMBEDDED
    from rarefly.demo import select_frames
    from rarefly.posterior import build_posterior

    _require(EMBEDDED["small"])
    calibration = select_frames(_require(_data_dir() / "foundation_valid.xyz"), 10)
    posterior = build_posterior("small", "lastlayer", training_frames, calibration)
    path = tmp_path_factory.mktemp("model") / "lastlayer.rfly"
    posterior.save(path)
    return path


@pytest.fixture(scope="session")
def child_env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session", autouse=True)
def _remove_socket_files():
    """ipc endpoints and i-PI UNIX sockets of this session's tests live in /tmp under names
    that carry the pytest process id; killed peers (on purpose, in the failure tests) leave
    them behind, so they are removed at the end of the session."""
    yield
    import glob

    pid = os.getpid()
    for pattern in (f"/tmp/rarefly-cv-test-{pid}-*", f"/tmp/ipi_rarefly-cv*-{pid}",
                    f"/tmp/rarefly-cv-test-{pid}"):
        for path in glob.glob(pattern):
            try:
                os.unlink(path)
            except OSError:
                pass
