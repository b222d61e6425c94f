"""User state and result cache behind one async interface.

base (StateStore, checks, gc_paused) < snapshot (the snapshot file) < memory, redis (one file
per backend) < sync (the memory state as a fold of the event log) < factory (open_state_store).
"""
