"""What every room shares: the operator and trigger base classes, task states and the records
that cross the store boundary, the stored forms of values and classpaths, and settings.

Internal as modules: the public names (``BaseOperator``, ``BaseTrigger``, ``TaskState``, ...)
are re-exported by ``deferrun``; import them from there."""
