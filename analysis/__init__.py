"""Studies, sweeps, statistics, figures and the report, built on the backends."""
