"""train: the training stack shared by every stage (data, optimizer, step, checkpoints, loop)."""
import time

STARTED = time.perf_counter()  # at import: what a run's `startup_s` (time to its first step) counts from
