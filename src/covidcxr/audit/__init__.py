"""Trust audits of a trained classifier: backdoor simulation and detection, the shortcut scorecard (docs/audits.md).

Level 4 (tests/test_layering.py): it reads runs (models), predicts through the evaluation proxies'
path and writes its verdicts into the run record; nothing below it imports it.
"""
