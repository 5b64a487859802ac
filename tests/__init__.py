"""deferrun's test suite: one folder per room of the code, helpers in tests.support."""
