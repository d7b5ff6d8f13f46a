"""The commands: train, md, sample, mcmc and compare, the run directory and its summary files."""
