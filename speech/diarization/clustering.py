"""Grouping (chunk, local speaker) embeddings into speakers.

Why not pyannote's own: offline we have no PLDA, so VBx is out, and its agglomerative step
answers a forced speaker count by taking whatever tree cut has that many clusters, which on
short meetings splits the dominant voice. This keeps pyannote's interface (`BaseClustering`:
filtering, constrained centroid assignment) and replaces `cluster`: centroid-linkage AHC at a
threshold chosen per file at the widest gap of the dendrogram inside a fixed range, a forced
count cut as near that threshold as possible, and clusters a hint forced apart merged back when
their voices are too close (figures in docs/diarization.md).
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

    threshold: float = 0.8
    """Centroid-linkage euclidean distance (unit-normalised embeddings) under which clusters merge,
    when no merge height of the file's dendrogram falls inside `threshold_range`."""
    threshold_range: tuple[float, float] = (0.7, 1.0)
    """The threshold is set per file in the middle of the widest gap between consecutive merge
    heights inside this range: one global value splits a voice on one meeting and merges two on
    another (the 0.6/0.7 cliff); the gap is where this file's voices separate."""
    min_cluster_size: int = 2
    """Clusters with fewer embeddings are folded into the nearest large one."""
    forced_split_min: float = 0.8
    """When a speaker-count hint forces more clusters than the threshold found, clusters whose
    centroids are closer than this are merged back: a forced split of one voice helps no one."""
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
        threshold = widest_gap_threshold(dendrogram[:, 2], self.params.threshold_range, self.params.threshold)
        by_threshold = fcluster(dendrogram, threshold, criterion="distance") - 1
        min_size = self._min_size(n)
        natural = _num_large(by_threshold, min_size)
        k = int(np.clip(num_clusters or natural, min_clusters, max_clusters))
        clusters = by_threshold
        if num_clusters is not None or k != natural:
            near = len(np.unique(by_threshold))
            clusters = _cut_to_large(dendrogram, k, min_size, n, near)
        clusters = _fold_small(x, clusters, min_size)
        # a hint may ask for more voices than the embeddings separate: merge those back
        return _merge_close(x, clusters, self.params.forced_split_min, keep=min(natural, max_clusters))

    def _min_size(self, n: int) -> int:
        return min(self.params.min_cluster_size, max(1, round(0.1 * n)))


def widest_gap_threshold(heights: np.ndarray, bounds: tuple[float, float], default: float) -> float:
    """Middle of the widest gap between consecutive merge heights, clipped to `bounds`;
    `default` when no gap overlaps the bounds (all merges far below or above them)."""
    lo, hi = bounds
    h = np.append(np.sort(heights)[::-1], 0.0)
    best, threshold = -1.0, default
    for upper, lower in zip(h[:-1], h[1:]):
        if lower >= hi or upper <= lo:
            continue
        top, bottom = min(upper, hi), max(lower, lo)
        if top - bottom > best:
            best, threshold = top - bottom, (top + bottom) / 2
    return float(threshold)


def _num_large(clusters: np.ndarray, min_size: int) -> int:
    _, counts = np.unique(clusters, return_counts=True)
    return max(1, int(np.sum(counts >= min_size)))


def _cut_to_large(dendrogram: np.ndarray, k: int, min_size: int, n: int, near: int) -> np.ndarray:
    """The cut of the tree with k clusters of at least min_size items that is closest to the
    threshold's own cut (`near` clusters in all): a forced count should move the threshold as
    little as possible, not take the tree's top split (often one outlier group vs everyone)."""
    totals = range(1, min(n, 4 * max(k, near) + 20) + 1)
    cuts = {total: fcluster(dendrogram, total, criterion="maxclust") - 1 for total in totals}
    large = {total: _num_large(c, min_size) for total, c in cuts.items()}
    best = min(cuts, key=lambda total: (abs(large[total] - k), abs(total - near)))
    return cuts[best]


def _merge_close(x: np.ndarray, clusters: np.ndarray, min_distance: float, keep: int) -> np.ndarray:
    """Merge the closest pair of centroids while closer than min_distance and above `keep` clusters."""
    while clusters.max() + 1 > keep:
        centroids = np.vstack([x[clusters == k].mean(0) for k in range(clusters.max() + 1)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        d = cdist(centroids, centroids)
        np.fill_diagonal(d, np.inf)
        a, b = np.unravel_index(np.argmin(d), d.shape)
        if d[a, b] >= min_distance:
            break
        clusters = np.unique(np.where(clusters == max(a, b), min(a, b), clusters), return_inverse=True)[1]
    return clusters


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
