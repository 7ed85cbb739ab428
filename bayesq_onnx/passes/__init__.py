"""Compile passes: one module each, named for what it does (docs/design.md §6)."""
