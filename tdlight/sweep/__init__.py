"""Optuna multi-objective sweeps over any tdlight config key (``tdlight sweep``, ``tdlight sweep-report``)."""
