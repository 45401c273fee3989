"""Fuzz harnesses for every parser of outside input (README: Fuzzing)."""
