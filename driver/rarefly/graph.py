"""Structures -> the batched graph dictionary a MACE model reads.

One neighbour list per structure (matscipy, through mace's ``get_neighborhood``), graphs
concatenated into one batch so that all beads / all structures go through one forward pass.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rarefly.prediction import InputError, Structure

#: two atoms closer than this (Angstrom) are reported as overlapping
MIN_DISTANCE = 0.1


def check_structure(s: Structure, atomic_numbers: Sequence[int]) -> None:
    """Raise :class:`InputError` with one sentence if ``s`` cannot be evaluated."""
    pos = np.asarray(s.positions)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) != len(s.numbers):
        raise InputError(
            f"got {len(s.numbers)} atomic numbers but positions of shape {pos.shape}; "
            "positions must be (N, 3) for N atoms")
    if not np.all(np.isfinite(pos)):
        bad = int(np.argwhere(~np.isfinite(pos))[0, 0])
        raise InputError(f"position of atom {bad} is not finite (NaN or inf); "
                         "the simulation has probably blown up: lower the time step or check the input")
    unknown = sorted(set(int(z) for z in s.numbers) - set(int(z) for z in atomic_numbers))
    if unknown:
        from ase.data import chemical_symbols

        names = ", ".join(chemical_symbols[z] for z in unknown)
        known = ", ".join(chemical_symbols[z] for z in atomic_numbers)
        raise InputError(f"element(s) {names} not in the model (it knows {known}); "
                         "fine-tune a model that includes them with `rarefly fit`")
    if s.cell is not None and any(s.pbc):
        vol = abs(np.linalg.det(np.asarray(s.cell)))
        if not np.isfinite(vol) or vol < 1e-6:
            raise InputError("the periodic cell has zero volume; give three independent lattice vectors")


def _overlap_check(pos: np.ndarray, sender: np.ndarray, receiver: np.ndarray,
                   shifts: np.ndarray) -> None:
    if len(sender) == 0:
        return
    d = np.linalg.norm(pos[receiver] - pos[sender] - shifts, axis=1)
    k = int(np.argmin(d))
    if d[k] < MIN_DISTANCE:
        raise InputError(f"atoms {int(sender[k])} and {int(receiver[k])} overlap "
                         f"({d[k]:.3f} A apart); check the input geometry or the time step")


def build_graph(structures: Sequence[Structure], r_max: float, atomic_numbers: Sequence[int],
                dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Batch ``structures`` into one MACE input dictionary (positions in Angstrom)."""
    from rarefly._compat import import_mace

    import_mace("mace.data.neighborhood")
    from mace.data.neighborhood import get_neighborhood

    z_index = {int(z): i for i, z in enumerate(atomic_numbers)}
    pos_l, attrs_l, ei_l, sh_l, ush_l, cell_l, batch_l, ptr = [], [], [], [], [], [], [], [0]
    offset = 0
    for g, s in enumerate(structures):
        check_structure(s, atomic_numbers)
        pos = np.asarray(s.positions, dtype=float)
        n = len(pos)
        pbc = tuple(bool(p) for p in s.pbc) if s.cell is not None else (False, False, False)
        cell = np.array(s.cell, dtype=float) if s.cell is not None else np.zeros((3, 3))
        edge_index, shifts, unit_shifts, cell_used = get_neighborhood(
            positions=pos, cutoff=float(r_max), pbc=pbc, cell=cell.copy())
        _overlap_check(pos, edge_index[0], edge_index[1], shifts)
        onehot = np.zeros((n, len(z_index)))
        onehot[np.arange(n), [z_index[int(z)] for z in s.numbers]] = 1.0
        pos_l.append(pos)
        attrs_l.append(onehot)
        ei_l.append(edge_index + offset)
        sh_l.append(shifts)
        ush_l.append(unit_shifts)
        cell_l.append(cell if any(pbc) else np.zeros((3, 3)))
        batch_l.append(np.full(n, g))
        offset += n
        ptr.append(offset)

    def t(x, dt=dtype):
        return torch.as_tensor(np.concatenate(x) if isinstance(x, list) else x, dtype=dt, device=device)

    return {
        "positions": t(pos_l),
        "node_attrs": t(attrs_l),
        "edge_index": torch.as_tensor(np.concatenate(ei_l, axis=1), dtype=torch.long, device=device),
        "shifts": t(sh_l),
        "unit_shifts": t(ush_l),
        "cell": t(cell_l),
        "batch": torch.as_tensor(np.concatenate(batch_l), dtype=torch.long, device=device),
        "ptr": torch.as_tensor(np.array(ptr), dtype=torch.long, device=device),
        "head": torch.zeros(len(structures), dtype=torch.long, device=device),
    }
