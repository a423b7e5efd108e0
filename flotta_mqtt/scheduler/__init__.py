"""The scheduler: binds submitted artifacts into DAGs of jobs, dispatches them, owns their state.

`core` decides (no threads, no I/O) with the policies `binding`, `retries`, `deadlines`
and `resends`, over the records of `records` and through `jobs` and `announcements`;
`repository` keeps the truth in SQLite; `service` wires the core to the bus.
"""
