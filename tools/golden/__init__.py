"""Fixture makers for the golden tests, one module per part; run through tools/make_golden_fixtures.py."""
