"""Plumbing every long-running process shares: start-up trust, event loop choice, logging and
per-task log lines, metrics, heartbeats, the loop watchdog and containment of user tasks.
Internal."""
