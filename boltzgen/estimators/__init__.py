"""Estimators on importance-weighted and on correlated samples: numpy float64 in, results in kT.

One module per kind: ``arrays`` (shared numerics), ``weights`` (ESS, Pareto k̂, PSIS, truncation),
``free_energy`` (ΔF between states, MBAR), ``timeseries`` (block means, autocorrelation times),
``histograms`` (free-energy surfaces and their distances), ``umbrella`` (umbrella-sampling analysis).
"""
