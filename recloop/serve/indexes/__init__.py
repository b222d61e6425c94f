"""Item indexes: the top-K items by inner product for a batch of query vectors.

base (the interface, shared checks and top-k helpers) < exact, ivf, sharded, remote (one file
per implementation) < local (an in-process index of a kind) < factory (build_index).
"""
