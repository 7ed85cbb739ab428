"""Compile passes: one module each, named for what it does (DESIGN §6)."""
