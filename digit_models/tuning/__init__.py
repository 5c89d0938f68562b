"""`digits tune`: hyperparameter search on Ray Tune, every trial an ordinary `digits train` run.

Owns the search space (`space.py`: a file's or a preset's, checked before Ray starts), the
search (`search.py`: a Ray Tune Tuner whose trials each start a Ray Train run through
training/driver.py, early stopping, resume) and its records (`results.py`: the results table and
best.json). Imports training, runtime, storage and the base modules; only the CLI imports it.
"""
