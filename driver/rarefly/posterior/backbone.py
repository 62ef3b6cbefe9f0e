"""A MACE forward pass written for posteriors: per-atom energies, last-layer features and
strain, with positions as an explicit input.

Why our own forward instead of ``ScaleShiftMACE.forward``: mace's forward calls
``requires_grad_`` on its inputs and returns only reduced quantities, which rules out
``torch.func`` transforms (vmap over posterior samples) and hides the last-layer features
that the last-layer posterior needs. The modules (embedding, interactions, products,
readouts, scale/shift) are mace's own; only the wiring is repeated here, for the
single-head ScaleShiftMACE family (the MACE-MP / MACE-OFF foundation models and their
fine-tunes). ``tests/test_posterior_*.py`` checks energies and forces against mace's own
forward.

Readout linearisation: every MACE readout is linear in its *last* weight matrix. A
``LinearReadoutBlock`` maps the scalar channels ``h0`` of a layer linearly to an energy; a
``NonLinearReadoutBlock`` maps ``z = act(W1 h0)`` linearly. So the node energy is

    e_i = e0(Z_i) + scale * (pair_i + phi_i . theta) + shift,

with ``phi_i`` the concatenation of those readout inputs and ``theta`` the readout weights
(read off mace's modules by probing them with unit vectors, so e3nn's normalisation
constants are folded in). ``theta`` is what :mod:`rarefly.posterior.lastlayer` is Bayesian
over. ``phi_i`` also ends with the one-hot element encoding of atom ``i`` (weights starting at
zero): per-element energy shifts, the commonest systematic error of a foundation model on a
new reference method, are then learned with the readout instead of being mistaken for noise.
"""

from __future__ import annotations

import torch
from torch import nn


def _scalar_dim(irreps) -> int:
    return sum(mul for mul, ir in irreps if ir.l == 0 and ir.p == 1)


class Backbone(nn.Module):
    """Wraps a ScaleShiftMACE; ``forward`` returns per-node energies and readout features."""

    def __init__(self, model: nn.Module, head: int = 0):
        super().__init__()
        name = type(model).__name__
        if name != "ScaleShiftMACE":
            raise ValueError(f"rarefly supports ScaleShiftMACE models (MACE-MP, MACE-OFF and their "
                             f"fine-tunes); this checkpoint holds a {name}")
        self.model = model
        self.head = head
        self.r_max = float(model.r_max)
        self.atomic_numbers = [int(z) for z in model.atomic_numbers]
        # scalar channels feeding each readout
        self.readout_dims: list[int] = []
        for readout in model.readouts:
            if hasattr(readout, "linear_2"):
                self.readout_dims.append(_scalar_dim(readout.linear_2.irreps_in))
            else:
                self.readout_dims.append(_scalar_dim(readout.linear.irreps_in))
        self.num_elements = len(self.atomic_numbers)
        #: does the per-node ``fixed`` energy depend on positions (ZBL pair repulsion)?
        self.has_pair_term = hasattr(model, "pair_repulsion")
        self.num_features = sum(self.readout_dims) + self.num_elements

    # ------------------------------------------------------------------ readout weights
    @torch.no_grad()
    def readout_weights(self) -> torch.Tensor:
        """theta: the readout weights such that readout energy = phi . theta (head ``head``)."""
        thetas = []
        for readout, dim in zip(self.model.readouts, self.readout_dims):
            lin = readout.linear_2 if hasattr(readout, "linear_2") else readout.linear
            probe = torch.zeros(dim, lin.irreps_in.dim, dtype=self._dtype())
            probe[:, :dim] = torch.eye(dim, dtype=self._dtype())
            out = lin(probe)  # (dim, num_heads)
            thetas.append(out[:, self.head])
        thetas.append(torch.zeros(self.num_elements, dtype=self._dtype()))  # element shifts
        return torch.cat(thetas)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ forward
    def forward(self, data: dict[str, torch.Tensor], positions: torch.Tensor,
                strain: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-node energy terms.

        positions: (n_nodes, 3) Angstrom (the tensor to differentiate with respect to).
        strain: (n_graphs, 3, 3) symmetric displacement for stress, or None.
        Returns ``fixed`` (n_nodes,): e0 + scale*pair + shift, ``phi`` (n_nodes, D): readout
        features already multiplied by ``scale``, and ``energy`` (n_nodes,): the MACE node
        energies with mace's own readout weights.
        """
        m = self.model
        batch = data["batch"]
        sender, receiver = data["edge_index"][0], data["edge_index"][1]
        num_graphs = data["ptr"].numel() - 1
        cell = data["cell"].view(-1, 3, 3)
        if strain is not None:
            sym = 0.5 * (strain + strain.transpose(-1, -2))
            positions = positions + torch.einsum("ni,nij->nj", positions, sym[batch])
            cell = cell + torch.matmul(cell, sym)
        edge_graph = batch[sender]
        shifts = torch.einsum("ei,eij->ej", data["unit_shifts"], cell[edge_graph])
        vectors = positions[receiver] - positions[sender] + shifts
        lengths = torch.linalg.vector_norm(vectors, dim=1, keepdim=True)

        node_attrs = data["node_attrs"]
        node_heads = torch.full_like(batch, self.head)
        n_nodes = node_attrs.shape[0]
        arange = torch.arange(n_nodes, device=node_attrs.device)
        node_e0 = m.atomic_energies_fn(node_attrs)[arange, node_heads]

        node_feats = m.node_embedding(node_attrs)
        edge_attrs = m.spherical_harmonics(vectors)
        edge_feats, cutoff = m.radial_embedding(lengths, node_attrs, data["edge_index"], m.atomic_numbers)
        if hasattr(m, "pair_repulsion"):
            pair = m.pair_repulsion_fn(lengths, node_attrs, data["edge_index"], m.atomic_numbers)
        else:
            pair = torch.zeros_like(node_e0)

        feats_list = []
        for i, (interaction, product) in enumerate(zip(m.interactions, m.products)):
            node_feats, sc = interaction(node_attrs=node_attrs, node_feats=node_feats,
                                         edge_attrs=edge_attrs, edge_feats=edge_feats,
                                         edge_index=data["edge_index"], cutoff=cutoff,
                                         first_layer=(i == 0))
            node_feats = product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
            feats_list.append(node_feats)

        phis, energies = [], [pair]
        for i, (readout, dim) in enumerate(zip(m.readouts, self.readout_dims)):
            h = feats_list[-1 if len(m.readouts) == 1 else i]
            if hasattr(readout, "linear_2"):
                z = readout.non_linearity(readout.linear_1(h))
                energies.append(readout.linear_2(z)[arange, node_heads])
            else:
                z = h[:, :dim]
                energies.append(readout.linear(h)[arange, node_heads])
            phis.append(z)
        scale = m.scale_shift.scale
        shift = m.scale_shift.shift
        scale = scale[self.head] if scale.dim() > 0 else scale
        shift = shift[self.head] if shift.dim() > 0 else shift
        inter = torch.stack(energies).sum(0)
        return {
            "fixed": node_e0 + scale * pair + shift,
            "phi": torch.cat([scale * torch.cat(phis, dim=-1), node_attrs], dim=-1),
            "energy": node_e0 + scale * inter + shift,
            "num_graphs": torch.tensor(num_graphs),
        }


def _scatter_sum_out_of_place(src, index, dim=-1, out=None, dim_size=None, reduce="sum"):
    """mace's ``scatter_sum`` without the in-place ``scatter_add_`` (which vmap rejects)."""
    from mace.tools.scatter import _broadcast

    index = _broadcast(index, src, dim)
    if out is None:
        size = list(src.size())
        if dim_size is not None:
            size[dim] = dim_size
        elif index.numel() == 0:
            size[dim] = 0
        else:
            size[dim] = int(index.max()) + 1
        out = torch.zeros(size, dtype=src.dtype, device=src.device)
    return out.scatter_add(dim, index, src)


class vmappable_mace:  # noqa: N801 - used as a context manager
    """Within this context, mace's modules use an out-of-place scatter so that
    ``torch.func.vmap`` can batch over posterior samples. Same arithmetic, no global change
    outside the context."""

    _targets = ("mace.modules.blocks", "mace.modules.radial", "mace.modules.utils")

    def __enter__(self):
        import importlib

        self._saved = []
        for name in self._targets:
            mod = importlib.import_module(name)
            if hasattr(mod, "scatter_sum"):
                self._saved.append((mod, mod.scatter_sum))
                mod.scatter_sum = _scatter_sum_out_of_place
        return self

    def __exit__(self, *exc):
        for mod, fn in self._saved:
            mod.scatter_sum = fn
        return False
