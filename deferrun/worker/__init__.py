"""The worker room: claims runnable tasks, runs one attempt of operator code per slot, and
records each outcome fenced on the attempt's claim token. Internal: nothing here is public."""
