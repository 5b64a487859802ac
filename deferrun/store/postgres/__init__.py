"""The PostgreSQL backend, through asyncpg: its connector and schema."""
