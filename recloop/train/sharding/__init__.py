"""Model parallelism: the item table sharded over processes with TorchRec (`train.sharding`)."""
