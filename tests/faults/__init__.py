"""Reliability suites (issue 7): bad specs, bad datasets and files, and faults (slow).

``tests/faults/summary`` runs them with pytest and prints the figures.
"""
