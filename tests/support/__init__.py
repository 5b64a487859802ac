"""Helpers shared by the test rooms and the benchmarks: servers on loopback, a throwaway
PostgreSQL cluster, real ``deferrun`` subprocesses, and the user code those processes import
(by classpath ``tests.support.<module>.<Class>``, with the repository root on PYTHONPATH)."""
