"""The triggerer room: one asyncio process that claims stored triggers, runs them (identical
ones once), fires timers from a heap, and writes fired events back in batches. Internal."""
