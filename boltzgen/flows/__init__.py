"""Normalizing flows: bijections, priors, molecular coordinates, and a flow built from its config."""
