"""Inference engines: users' item sequences in, query vectors for the item index out.

Imports point down: base (the interface, buckets and buffers) < export (the ONNX export and
its cache) < onnx, torch (one file per engine); base, export < parity (the check against the
torch reference); all of them < factory (build_engine, engine_with_weights, warmup, the only
module that picks an engine).
"""
