"""Inference engines: users' item sequences in, query vectors for the item index out.

base (the interface, buckets and buffers) < export (the ONNX export and its cache) < onnx,
torch (one file per engine) < parity (the check against the torch reference) < factory
(build_engine, engine_with_weights, warmup).
"""
