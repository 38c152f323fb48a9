"""Grouping (chunk, local speaker) embeddings into speakers.

Why not pyannote's own: offline we have no PLDA, so VBx is out, and a single hand-set
agglomerative threshold has a cliff (0.6 splits, 0.7 merges, see docs/diarization.md). This keeps
pyannote's interface (`BaseClustering`: filtering, centroid assignment) and replaces the
`cluster` step with centroid-linkage AHC whose cut is chosen per file (see `choose_num_clusters`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyannote.audio.pipelines.clustering import BaseClustering
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist


@dataclass(frozen=True)
class ClusteringParams:
    """Tuned on the dev recordings; the figures that chose them are in docs/diarization.md."""

    threshold: float = 0.6
    """Centroid-linkage euclidean distance (unit-normalised embeddings) under which clusters merge."""
    min_cluster_size: int = 2
    """Clusters with fewer embeddings are folded into the nearest large one."""
    method: str = "centroid"
    """scipy linkage method on unit-normalised embeddings (euclidean)."""
    min_active_ratio: float = 0.2
    """A (chunk, speaker) embedding is trusted for clustering when alone for this share of the chunk."""


class SpeakerClustering(BaseClustering):
    """Centroid agglomerative clustering of L2-normalised CAM++ embeddings."""

    expects_num_clusters: bool = False

    def __init__(self, params: ClusteringParams | None = None) -> None:
        super().__init__(metric="cosine", constrained_assignment=True)
        self.params = params or ClusteringParams()

    def filter_embeddings(self, embeddings, segmentations=None, min_active_ratio=None):  # type: ignore[override]
        ratio = self.params.min_active_ratio if min_active_ratio is None else min_active_ratio
        return super().filter_embeddings(embeddings, segmentations, min_active_ratio=ratio)

    def cluster(
        self,
        embeddings: np.ndarray,
        min_clusters: int,
        max_clusters: int,
        num_clusters: int | None = None,
    ) -> np.ndarray:
        """(n, dim) embeddings -> (n,) cluster indices 0..k-1."""
        n = embeddings.shape[0]
        if n == 1:
            return np.zeros(1, dtype=int)
        x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        dendrogram = linkage(x, method=self.params.method, metric="euclidean")
        # as pyannote: the threshold is a euclidean distance between unit-normalised centroids
        by_threshold = fcluster(dendrogram, self.params.threshold, criterion="distance") - 1
        k = num_clusters or _num_large(by_threshold, self._min_size(n))
        k = int(np.clip(k, min_clusters, max_clusters))
        clusters = by_threshold if num_clusters is None and k == _num_large(by_threshold, self._min_size(n)) else None
        if clusters is None:
            near = len(np.unique(by_threshold))
            clusters = _cut_to_large(dendrogram, k, self._min_size(n), n, near)
        return _fold_small(x, clusters, self._min_size(n))

    def _min_size(self, n: int) -> int:
        return min(self.params.min_cluster_size, max(1, round(0.1 * n)))


def _num_large(clusters: np.ndarray, min_size: int) -> int:
    _, counts = np.unique(clusters, return_counts=True)
    return max(1, int(np.sum(counts >= min_size)))


def _cut_to_large(dendrogram: np.ndarray, k: int, min_size: int, n: int, near: int) -> np.ndarray:
    """The cut of the tree with k clusters of at least min_size items that is closest to the
    threshold's own cut (`near` clusters in all): a forced count should move the threshold as
    little as possible, not take the tree's top split (often one outlier group vs everyone)."""
    cuts = {total: fcluster(dendrogram, total, criterion="maxclust") - 1 for total in range(1, n + 1)}
    large = {total: _num_large(c, min_size) for total, c in cuts.items()}
    best = min(cuts, key=lambda total: (abs(large[total] - k), abs(total - near)))
    return cuts[best]


def _fold_small(x: np.ndarray, clusters: np.ndarray, min_size: int) -> np.ndarray:
    """Give each too-small cluster's members to the nearest large centroid; renumber 0..k-1."""
    labels, counts = np.unique(clusters, return_counts=True)
    large, small = labels[counts >= min_size], labels[counts < min_size]
    if len(large) == 0 or len(small) == 0:
        return np.unique(clusters, return_inverse=True)[1]
    centroids = np.vstack([x[clusters == k].mean(0) for k in large])
    out = clusters.copy()
    for k in small:
        members = clusters == k
        nearest = np.argmin(cdist(x[members].mean(0, keepdims=True), centroids, "cosine"))
        out[members] = large[nearest]
    return np.unique(out, return_inverse=True)[1]
