"""Unit tests of the benchmarks' verdict logic (pure functions, no models): the line that
says whether issue 4's target 1 is met must not call a run met, missed or open wrongly."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# the benchmark modules set thread counts and silence warnings for their own runs on import:
# keep both out of the other tests (and of the processes they start)
_environ = dict(os.environ)
with warnings.catch_warnings():
    import bench_label_value
    import bench_onthefly
os.environ.clear()
os.environ.update(_environ)


def _verdict(line: str) -> str:
    return line.split("): ", 1)[1].split(":", 1)[0]


@pytest.mark.parametrize("nc, na, c_calls, a_calls, expected", [
    (10, 20, 12, 26, "met"),            # both reached it: 10 <= 20 / 2
    (11, 20, 12, 26, "missed"),         # both reached it: 11 > 10
    (12, None, 12, 26, "met"),          # a_paper never did in 26 > 2 * 12
    (12, None, 12, 20, "not resolved"), # a_paper might have reached it at 21..24
    (None, 15, 12, 20, "missed"),       # c_ts did not within 12 >= 15 / 2
    (None, 30, 12, 40, "not resolved"), # c_ts stopped at 12 < 15: it might have made it
    (None, None, 12, 26, "not resolved"),
])
def test_target1_verdicts(nc, na, c_calls, a_calls, expected):
    line = bench_onthefly.target1("c_ts", nc, na, c_calls, a_calls, 0.17, 0.171, 0.172)
    assert _verdict(line) == expected, line


def test_target1_names_the_unit_and_how():
    line = bench_onthefly.target1("c_ts", 7, 22, 12, 26, 0.1694, 0.155, 0.165,
                                  unit="labels", how="replayed")
    assert line.startswith("TARGET 1 (c_ts <= half the labels of a_paper to reach 0.1694 eV/A, "
                           "replayed): met: 7 vs 22 labels")


def test_reached_counts_flagged_labels_only_when_asked():
    curve = [{"origin": o, "f": f} for o, f in
             [("audit", 0.19), ("flagged", 0.18), ("audit", 0.175), ("flagged", 0.16)]]
    assert bench_label_value.reached(curve, 0.17) == 4
    assert bench_label_value.reached(curve, 0.17, flagged_only=True) == 2
    assert bench_label_value.reached(curve, 0.15) is None
