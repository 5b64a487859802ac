"""Compatibility layers: run code written for other schedulers with its imports changed.

``deferrun.compat.airflow`` holds the names provider triggers and deferrable operators import
from Airflow's core modules, mapped onto deferrun's own concepts.
"""
