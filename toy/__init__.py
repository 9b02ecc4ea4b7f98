"""The future-reward-coupling toys behind train_toy.py.

exact.py         tabular student and teacher, every sequence enumerated: exact bias and variance of g_gamma
continuous.py    the 1-D two-task reaching replica: REINFORCE teachers, one student distilled with g_gamma
policy.py        its Gaussian MLP policy, one run and R runs at once
runs.py          many independent runs as one batched computation: the run axis, per-run seeds and gammas
report.py        what the studies show: summaries, printed tables, reading, CSV files
figures.py       the PNG figures (matplotlib optional)
audit.py         the estimator audit: every registered objective against the divergence it claims (python -m toy.audit)
audit_report.py  what the audit shows: its printed table, CSV file and figure
"""
