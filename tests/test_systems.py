"""The files of systems/: the peptide PDB script (ACE-(ALA)n-NME) and the tetra-alanine config."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import mdtraj
import numpy as np
import pytest
import torch

from boltzgen.config import load_config
from boltzgen.errors import ConfigError
from boltzgen.geometry import is_l_chirality
from boltzgen.states import backbone_torsions, dihedral_cvs, pdb_cv_names, resolve_states

SYSTEMS = Path(__file__).resolve().parents[1] / "systems"
TETRA_CONFIG = SYSTEMS / "tetraalanine_implicit.yaml"


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    """systems/make_alanine_pdb.py, imported as a module."""
    spec = importlib.util.spec_from_file_location("make_alanine_pdb", SYSTEMS / "make_alanine_pdb.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(("n_ala", "pdb"), [(1, "alanine-dipeptide.pdb"), (3, "tetraalanine.pdb")])
def test_script_builds_capped_l_alanines_and_the_checked_in_pdb(script: ModuleType, tmp_path: Path, n_ala: int,
                                                                 pdb: str) -> None:
    peptide = script.build(n_ala)
    top = mdtraj.Topology.from_openmm(peptide.topology)
    assert top.n_atoms == 12 + 10 * n_ala  # 42 for tetra-alanine
    assert [r.name for r in top.residues] == ["ACE", *["ALA"] * n_ala, "NME"]
    assert peptide.chirality_nm3.shape == (n_ala,) and (peptide.chirality_nm3 > 0).all()
    assert is_l_chirality(torch.as_tensor(peptide.positions_nm).reshape(1, -1), top).item()
    assert peptide.phi_deg.shape == (n_ala,) and (peptide.phi_deg < 0).all()
    # The checked-in file is the script's output. About one rebuild in ten ends its minimization
    # ~1e-4 nm away (the script before n > 1 did too), which moves the PDB's last printed digit.
    script.write_pdb(peptide, tmp_path / pdb)
    rebuilt, checked_in = mdtraj.load(str(tmp_path / pdb)), mdtraj.load(str(SYSTEMS / pdb))
    assert [str(a) for a in rebuilt.top.atoms] == [str(a) for a in checked_in.top.atoms]
    np.testing.assert_allclose(rebuilt.xyz, checked_in.xyz, rtol=0, atol=1e-3)


def test_tetraalanine_config_states_read_the_central_phi() -> None:
    config, _ = load_config(TETRA_CONFIG)
    traj = mdtraj.load(str(config.system.pdb))
    assert traj.n_atoms == 42
    torsions = backbone_torsions(traj.top)
    assert [traj.top.atom(i).residue.index for i in torsions["phi1"][1:]] == [2, 2, 2]  # N, CA, C of ALA3
    states = resolve_states(config.states)
    assert states["B"].names_used() == {"phi1"} and states["A"].names_used() == {"phi1"}
    cvs = dihedral_cvs(traj.xyz.astype(np.float64), torsions)
    phi1_in_b = {**cvs, "phi1": np.array([1.0])}
    others_in_b = {name: np.array([1.0]) for name in cvs} | {"phi1": np.array([-1.4])}
    assert states["B"](phi1_in_b).all() and not states["A"](phi1_in_b).any()
    assert not states["B"](others_in_b).any() and states["A"](others_in_b).all()


def test_tetraalanine_unknown_residue_index_is_a_config_error(tmp_path: Path) -> None:
    text = TETRA_CONFIG.read_text().replace("pdb: tetraalanine.pdb", f"pdb: {SYSTEMS / 'tetraalanine.pdb'}")
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace('"0 < phi1 < 2.2"', '"0 < phi3 < 2.2"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: states: B: unknown CV phi3;")
    assert pdb_cv_names(SYSTEMS / "tetraalanine.pdb") == ["phi0", "phi1", "phi2", "phi", "psi0", "psi1", "psi2", "psi"]
