"""Connections: ``DEFERRUN_CONN_<ID>`` URIs, the redaction of every secret they hold, and one
client per connection and event loop. Internal; triggers reach it through ``conn_id``."""
