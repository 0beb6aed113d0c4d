"""Scenario runners, one per kind of job; each writes the same kind of record (DESIGN.md sections 6-7)."""
