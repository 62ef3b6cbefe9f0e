"""Real i-PI running rarefly in-process through ``<ffdirect>``: 4-bead PIMD, batched."""

from __future__ import annotations

import numpy as np
import pytest

from rarefly.demo import PREFIX, IPIRun, ffdirect_xml, input_xml, read_extras, read_properties

pytestmark = pytest.mark.slow

NBEADS = 4
STEPS = 20
#: a guard against hangs, not a speed target: a quiet 2-core machine needs a third of it
RUN_TIMEOUT = 300

# i-PI loads a <pes>custom</pes> by file path; this one is rarefly.pes with a log of how many
# structures reach each posterior.predict call.
COUNTING_PES = '''
from rarefly.pes import RareflyPES

__DRIVER_NAME__ = "rarefly_counting"
__DRIVER_CLASS__ = "CountingPES"
LOG = {log!r}


class CountingPES(RareflyPES):
    def check_parameters(self):
        super().check_parameters()
        predict = self.posterior.predict

        def counted(structures):
            with open(LOG, "a") as fh:
                fh.write(f"{{len(structures)}}\\n")
            return predict(structures)

        self.posterior.predict = counted
'''


def test_pimd_through_ffdirect_batches_all_beads(tmp_path, model_file, ethanol_xyz):
    log = tmp_path / "predict_calls.log"
    pes = tmp_path / "counting_pes.py"
    pes.write_text(COUNTING_PES.format(log=str(log)))
    forcefield = ffdirect_xml(ethanol_xyz, model_file, batch_size=NBEADS, pes_path=pes)
    (tmp_path / "input.xml").write_text(
        input_xml(forcefield, ethanol_xyz, STEPS, nbeads=NBEADS, timestep_fs=0.5))
    with IPIRun(tmp_path) as sim:
        sim.wait(timeout=RUN_TIMEOUT)

    props = read_properties(tmp_path / f"{PREFIX}.out")
    assert props["step"].tolist() == list(range(STEPS + 1))
    assert np.all(np.isfinite(props["potential"]))
    # one posterior.predict per force evaluation (initial + one per step), all beads in it
    calls = [int(x) for x in log.read_text().split()]
    assert calls == [NBEADS] * (STEPS + 1)
    # each bead has its own extras file, with positive, finite uncertainties
    for bead in range(NBEADS):
        unc = read_extras(tmp_path / f"{PREFIX}.uncertainty_{bead}")
        assert unc.shape == (STEPS + 1, 2)
        assert np.all(np.isfinite(unc)) and np.all(unc[:, 0] > 0)
        assert np.all((unc[:, 1] >= 0) & (unc[:, 1] <= 1))
        fsig = read_extras(tmp_path / f"{PREFIX}.forces_sigma_{bead}")
        assert fsig.shape == (STEPS + 1, 9) and np.all(fsig > 0)
    # beads differ, so do their uncertainties
    first = [read_extras(tmp_path / f"{PREFIX}.uncertainty_{b}")[-1, 0] for b in range(NBEADS)]
    assert len(set(first)) > 1
