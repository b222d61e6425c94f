"""Item indexes: the top-K items by inner product for a batch of query vectors.

Imports point down: base (the interface, shared checks and top-k helpers) < exact, ivf,
milvus, sharded (one file per implementation) < local (an index of a kind) < factory
(build_index, the only module that picks an implementation).
"""
