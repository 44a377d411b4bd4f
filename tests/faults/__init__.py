"""Fault tests: bad inputs, killed and failed runs, and the raw-log parser fuzzing.

``python -m tests.faults point=rank:index <command> ...`` runs ``recsys-kd`` with a fault injected
(see ``__main__.py``).
"""
