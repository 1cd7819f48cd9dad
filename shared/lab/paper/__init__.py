"""``invoke paper``: the published results on pvnet's mechanisms, reproduced side by side.

``rows.py`` holds what Xen's engineers published (figures read in the primary sources) and the
experiment that measures the same comparison here; ``model.py`` predicts each row's ratio from
per-operation microbenchmarks (``backend/opbench.py``) before it is measured; ``run.py`` runs
every row's experiment in one bench run (interleaved rounds); ``table.py`` turns the rounds
into ratios with intervals, verdicts and the table; ``plot.py`` draws theirs against ours.
"""
