"""The colocated baseline: one engine runs both phases (the system DistServe is compared against)."""
