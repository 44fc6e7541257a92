"""Test doubles shipped with disaggd (stand-in engine)."""
