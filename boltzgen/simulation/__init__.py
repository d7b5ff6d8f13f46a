"""OpenMM drivers: Langevin MD with checkpoints and biased (umbrella) runs; they return dataclasses."""
