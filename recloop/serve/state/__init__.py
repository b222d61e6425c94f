"""User state and result cache behind one async interface.

Imports point down: base (StateStore, checks, gc_paused) < snapshot (the snapshot file) <
memory (in-process backend) < sync (the memory state as a fold of the event log); base <
redis (the Redis backend); memory, redis < factory (open_state_store, the only module that
picks a backend).
"""
