"""Reliability suite (issue #12): network faults, hostile input, floods."""
