"""Helpers the tests share: plain modules, imported by test modules and by the conftest files.

Fixtures live in the conftest files (tests/conftest.py, tests/integration/conftest.py), helpers
here, one module per concern; no test module imports from another test module or a conftest.
"""
