"""Reading what a running trainer writes: its JSON-lines events and its ASE database."""

import json
import time


def read_events(path):
    """The trainer's events so far (a line still being written is skipped)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def while_unlocked(read, path, tries=50):
    """``read(db)`` on the ASE database at ``path``, retrying while the trainer holds it."""
    from ase.db import connect

    for _ in range(tries):
        try:
            return read(connect(str(path), type="db"))
        except Exception as exc:  # noqa: BLE001 - sqlite busy while the trainer writes
            # also transient: the trainer creating the database (tables there, ase's version
            # row not yet: ase's reader fails with a TypeError on the missing row)
            if ("locked" not in str(exc) and "no such table" not in str(exc)
                    and not isinstance(exc, TypeError)):
                raise
            time.sleep(0.1)
    raise AssertionError(f"{path} stayed locked")


def socket_md_xml(outputs: str, *, steps: int, socket: str, xyz, temperature: float, seed: int,
                  floatformat: str | None = None) -> str:
    """i-PI input: SVR NVT MD (0.5 fs) of the molecule in ``xyz`` in a 20 A box on an
    ``<ffsocket>`` named "rarefly" at UNIX socket ``socket``; ``outputs`` is the body of
    ``<output prefix="sim">``."""
    fmt = f' floatformat="{floatformat}"' if floatformat else ""
    return f"""<simulation verbosity="low"{fmt}>
  <output prefix="sim">
{outputs}
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name="rarefly" mode="unix" pbc="false"><address>{socket}</address><latency>1e-4</latency></ffsocket>
  <system>
    <initialize nbeads="1">
      <file mode="ase">{xyz}</file>
      <cell mode="abc" units="angstrom"> [20.0, 20.0, 20.0] </cell>
      <velocities mode="thermal" units="kelvin">{temperature:g}</velocities>
    </initialize>
    <forces><force forcefield="rarefly"/></forces>
    <ensemble><temperature units="kelvin">{temperature:g}</temperature></ensemble>
    <motion mode="dynamics"><dynamics mode="nvt">
      <timestep units="femtosecond">0.5</timestep>
      <thermostat mode="svr"><tau units="femtosecond">20</tau></thermostat>
    </dynamics></motion>
  </system>
</simulation>
"""
