"""Evaluation: whole/sliding/flip/multi-scale inference, confusion-matrix metrics, the loop and its writers."""
