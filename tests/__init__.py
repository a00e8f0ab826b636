"""The test suite. Its shared helpers are in tests/support/, its fixtures in the conftest files."""

import pytest

# The helpers in tests/support/ assert too (`cli`, `assert_balanced`, ...): pytest rewrites their
# asserts as it does the conftest files' and test modules', so a failure shows its values.
pytest.register_assert_rewrite("tests.support")
