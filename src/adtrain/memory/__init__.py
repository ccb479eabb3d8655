"""Memory bank: streamed collection, greedy coreset / k-means compression, FAISS or torch k-NN."""

from adtrain.memory.bank import MemoryBank
from adtrain.memory.coreset import greedy_coreset, kmeans, random_projection
from adtrain.memory.differentiable import bank_distances, gathered_distances, nearest_distances

__all__ = [
    "MemoryBank",
    "greedy_coreset",
    "kmeans",
    "random_projection",
    "nearest_distances",
    "gathered_distances",
    "bank_distances",
]
