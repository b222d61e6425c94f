"""Compression: make a trained version small and fast, and publish the result as a new version.

Every method reads one registry version and publishes one new version whose manifest records
``parent`` (the version it came from) and ``method``; ``recloop serve`` and ``recloop eval``
load it like any other, through :func:`recloop.registry.loading.load_model`.

| method             | what it does                                                         |
|--------------------|----------------------------------------------------------------------|
| `int8` / `int4`    | item table rows quantized with a per-row scale and offset, dense     |
|                    | (Linear) weights int8 per output channel (:mod:`.quantize`)          |
| `prune-magnitude`  | global unstructured magnitude pruning of the dense weights, then a   |
|                    | short fine-tune that keeps the zeros (:mod:`.prune`)                 |
| `prune-structured` | whole attention heads, FFN units / HSTU channels and the table rows  |
|                    | of dead items removed, then a short fine-tune (:mod:`.prune`)        |
| `distill`          | a new, smaller student trained on the version's soft targets over    |
|                    | the full catalogue plus the true next item (:mod:`.distill`)         |

A compressed model is an ordinary SASRec / HSTU whose modules were swapped for the ones in
:mod:`.modules`; the swap is described by a small JSON ``compression`` entry in the model
config, which :func:`recloop.models.factory.build_model` replays before loading the weights.
:mod:`.export` writes the user encoder to ONNX (and, where it works, TorchScript), with the
dense layers optionally int8 through ONNX Runtime's dynamic quantization.
"""
