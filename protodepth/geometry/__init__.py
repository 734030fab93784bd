"""Pure tensor geometry ops that mirror PyTorch3D 0.7.9 (signatures and results), without PyTorch3D.

Meshes are batches sharing one topology: verts (M, V, 3) with faces (F, 3), or faces (M, F, 3).
"""
from ._mode import capture_mode, host_reads_allowed
from .chamfer import chamfer_distance
from .icosphere import ico_sphere
from .knn import KNN, knn_gather, knn_points
from .mesh_losses import mesh_edge_loss, mesh_laplacian_smoothing, mesh_normal_consistency
from .rotations import euler_angles_to_matrix, matrix_to_euler_angles
from .sampling import points_from_barycentrics, sample_points_from_meshes
from . import custom_ops  # noqa: F401  (registers the protodepth:: custom ops)

__all__ = [
    "capture_mode",
    "host_reads_allowed",
    "ico_sphere",
    "euler_angles_to_matrix",
    "matrix_to_euler_angles",
    "KNN",
    "knn_points",
    "knn_gather",
    "chamfer_distance",
    "sample_points_from_meshes",
    "points_from_barycentrics",
    "mesh_edge_loss",
    "mesh_normal_consistency",
    "mesh_laplacian_smoothing",
]
