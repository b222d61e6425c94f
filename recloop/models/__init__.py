"""Sequential recommendation models. One model, one file; all share `SequentialEncoder`."""
