"""The embedded SQLite backend: its connector, file checks, local wake-ups and schema."""
