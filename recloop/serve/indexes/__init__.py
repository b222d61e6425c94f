"""Item indexes: the top-K items by inner product for a batch of query vectors.

Imports point down: base (the interface, shared checks and top-k helpers) < exact, ivf,
sharded (one file per implementation) < local (an in-process index of a kind) < remote (a
shard in another process, which builds its index with local) < factory (build_index, the only
module that picks an implementation).
"""
