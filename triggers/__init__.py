"""Built-in triggers, one module per kind: time, file, s3, http, sql, job."""
