"""Top-k inner-product search over groups of key sets: exact in torch, or with faiss.

The retrieval memory asks one question per call: for every query, which `k` stored keys have the
largest inner product with it? `ExactIndex` answers exactly with a matmul and `topk`; it is the
reference and the default, and right for stores up to some tens of thousands of entries.
`FaissIndex` answers with a faiss index built over the live keys: an HNSW graph (Malkov &
Yashunin, 2018) or an inverted file of k-means lists, approximate, for large stores; or
`IndexFlatIP` ("flat"), faiss's exact search.

Both take the keys of `G` independent groups at once (a group is one sequence's store for one
head) and return store ids, so the caller gathers the keys itself and keeps autograd in torch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

IndexKind = Literal["exact", "faiss"]
FaissMethod = Literal["hnsw", "ivf", "flat"]


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The `k` largest of `scores: [..., N]`, best first, `-inf` and id -1 where `N < k`.

    `-inf` scores mark keys that must not be found; they come back with id -1 too.
    """
    missing = k - scores.shape[-1]
    if missing > 0:
        pad = scores.new_full((*scores.shape[:-1], missing), float("-inf"))
        scores = torch.cat([scores, pad], dim=-1)
    best, ids = scores.topk(k, dim=-1)
    return best, ids.masked_fill(best == float("-inf"), -1)


class KnnIndex(ABC):
    """Maximum inner-product search, one key set per group."""

    @abstractmethod
    def search(self, keys: Tensor, valid: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """For every query, the `k` live keys of its group with the largest inner product.

        `keys: [G, N, Dh]`, `valid: [G, N]` bool (live keys), `queries: [G, T, Dh]` ->
        `scores, ids: [G, T, k]`, best first; where a group has fewer than `k` live keys, the
        places left over have score `-inf` and id -1. No autograd.
        """


class ExactIndex(KnnIndex):
    """Every score computed, then `topk`: exact, `O(T N Dh)` per group."""

    def search(self, keys: Tensor, valid: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            scores = torch.einsum("gtd,gnd->gtn", queries, keys)
            return top_k(scores.masked_fill_(~valid[:, None, :], float("-inf")), k)


class FaissIndex(KnnIndex):
    """A faiss index per group, built over the group's live keys at each `search`.

    `method="hnsw"` (default): `IndexHNSWFlat`, `neighbors` links per node, candidate lists of
    `ef_construction` when building and `ef_search` (at least `k`) when searching. `"ivf"`:
    `IndexIVFFlat` over `min(sqrt(n), n / 39)` k-means lists (39 training points per list, as
    faiss asks), `probes` of them searched; exact once `probes` reaches the list count.
    `"flat"`: `IndexFlatIP`, exact. faiss computes in float32; the caller gets ids and recomputes
    the scores it differentiates. Building costs more than one exact scan of the same keys, so an
    index built per call pays only when many queries share it (benchmarks/bench_retrieval.py).
    """

    def __init__(
        self,
        method: FaissMethod = "hnsw",
        neighbors: int = 32,
        ef_construction: int = 64,
        ef_search: int = 128,
        probes: int = 16,
    ) -> None:
        import_faiss()  # fail now, with the fix, rather than at the first search
        self.method = method
        self.neighbors = neighbors
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.probes = probes

    def build(self, keys: np.ndarray) -> Any:
        """A faiss index over `keys: [n, Dh]`, searched by inner product."""
        faiss = import_faiss()
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        count, dim = keys.shape
        inner_product = faiss.METRIC_INNER_PRODUCT
        if self.method == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.method == "ivf":
            lists = max(1, min(math.isqrt(count), count // 39))
            index = faiss.index_factory(dim, f"IVF{lists},Flat", inner_product)
            index.train(keys)
        else:
            index = faiss.IndexHNSWFlat(dim, self.neighbors, inner_product)
            index.hnsw.efConstruction = self.ef_construction
        index.add(keys)
        return index

    def query(self, index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids `[T, k]` of `queries: [T, Dh]` in a built index (id -1: none)."""
        if self.method == "hnsw":
            index.hnsw.efSearch = max(self.ef_search, k)
        elif self.method == "ivf":
            index.nprobe = self.probes
        return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def search(self, keys: Tensor, valid: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        groups, steps, _ = queries.shape
        scores = queries.new_full((groups, steps, k), float("-inf"))
        ids = torch.full((groups, steps, k), -1, dtype=torch.long, device=queries.device)
        with torch.no_grad():
            for g in range(groups):
                live = valid[g].nonzero().squeeze(1)  # [n] store ids of the live keys
                if live.numel() == 0:
                    continue
                index = self.build(keys[g, live].cpu().float().numpy())
                found_scores, found = self.query(index, queries[g].cpu().float().numpy(), k)
                found = torch.from_numpy(found).to(queries.device)  # [T, k] rows of `live`
                hit = found >= 0
                ids[g] = torch.where(hit, live[found.clamp(min=0)], -1)
                found_scores = torch.from_numpy(found_scores).to(scores)
                scores[g] = found_scores.masked_fill(~hit, float("-inf"))
        return scores, ids


def import_faiss() -> Any:
    """The faiss module, or an ImportError that says how to get it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "index='faiss' needs the faiss-cpu package, which is not installed: "
            "`pip install faiss-cpu` (or `pip install memlab[retrieval]`), or use index='exact'"
        ) from error
    return faiss


def make_index(kind: IndexKind) -> KnnIndex:
    """The index a retrieval layer's `index` setting names."""
    if kind == "faiss":
        return FaissIndex()
    return ExactIndex()
