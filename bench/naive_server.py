"""The baseline that bench/serve.py compares `recloop serve` with: the plain FastAPI + torch
server an ML engineer would write first for the same model.

It loads the same registry version with recloop's loader and the users' training histories
the way `recloop serve` does (the version's dataset, mapped into the model's item ids), and
answers the same URL, GET /v1/users/{user_id}/recommendations?k=10, with the same JSON fields.
Each request is computed on its own, on the event loop (so one at a time): torch eager under
``inference_mode``, scores against the whole item table, the user's seen items and the padding
row excluded, exact ``torch.topk``; the response is a plain dict that FastAPI serialises.
torch uses one thread, as `recloop serve`'s ONNX Runtime does.

    .venv/bin/python bench/naive_server.py --registry runs/bench-serve/beauty/registry --port 18081
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recloop.data.history import UserHistory
from recloop.data.vocabulary import Vocabulary
from recloop.registry import Registry
from recloop.registry.loading import load_model
from recloop.registry.sidefiles import vocabulary_path


def create_app(registry_path: Path, ref: str = "latest", data: Path | None = None) -> FastAPI:
    registry = Registry(registry_path)
    version = registry.resolve(ref)
    model, manifest = load_model(registry, version)
    catalog = Vocabulary.read(vocabulary_path(registry, version, manifest), first_id=1)
    dataset = data if data is not None else Path((manifest.dataset or {})["path"])
    history = UserHistory.open(dataset, catalog)
    max_length = int(model.config.max_length)
    with torch.inference_mode():
        table = model.item_embedding.output_table()  # [num_items + 1, D]
    app = FastAPI(title="naive recommender")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/users/{user_id}/recommendations")
    async def recommendations(user_id: str, k: int = 10, exclude_seen: bool = True) -> Any:
        seen = history.items(user_id)
        if len(seen) == 0:
            raise HTTPException(404, f"unknown user {user_id!r}")
        ids = torch.from_numpy(seen[-max_length:]).unsqueeze(0)  # [1, L]
        with torch.inference_mode():
            query = model.item_embedding.prepare_query(model.encode(ids))  # [1, D]
            scores = (query @ table.T)[0]  # [num_items + 1]
            scores[0] = -torch.inf  # padding
            if exclude_seen:
                scores[torch.from_numpy(seen)] = -torch.inf
            top = torch.topk(scores, min(k, len(scores) - 1))
        raw = catalog.raw_strings(top.indices.numpy())
        return {
            "cached": False,
            "model_version": version,
            "user_id": user_id,
            "items": [
                {"item_id": item, "score": round(score, 6)}
                for item, score in zip(raw, top.values.tolist(), strict=True)
                if score != -float("inf")
            ],
            "fallback": None,
            "unknown_items": [],
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--version", default="latest")
    parser.add_argument("--data", type=Path, default=None, help="default: the version's dataset")
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    app = create_app(args.registry, args.version, args.data)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
