"""The paper's comparison as one experiment (`python -m moiie_jax.study`): runner.py trains and evaluates the arms
of a table (configs/study.py), report.py writes the table with intervals and the figures."""
