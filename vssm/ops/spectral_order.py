"""Spectral VMamba's token orders: features -> permutations, from the graph-Laplacian spectrum of the tokens.

``spectral_order`` builds a k-NN graph over the tokens' features (Gaussian weights), takes the eigenvectors 2..T+1 of
its normalized Laplacian (dense ``eigh``, or a Chebyshev-filtered subspace iteration for many tokens) and sorts the
tokens by each of them. ``pooled_order`` carries the eigenvector fields to a stride-2 grid (the fixed mode's later
stages), ``propagate_order_upstream`` carries an order the way upstream does, and ``scan_index`` turns orders into
the index maps of :func:`vssm.ops.gather_tokens` / :func:`vssm.ops.scatter_tokens`.

Orders are integers: no gradient flows through any of this.

Shape legend: B batch, D feature width, H/W grid, L = H*W tokens, T eigenvectors (orders).
"""
from functools import partial
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .cuda_graph import CudaGraphCache
from .token_maps import inverse_permutation

__all__ = ['spectral_order', 'solver_graphs', 'EIGENSOLVERS', 'DENSE_MAX_TOKENS', 'ScanIndex', 'scan_index',
           'equivariant_pool', 'pooled_order', 'propagate_order_upstream']


def _knn_adjacency(tokens: Tensor, knn: int, batch_sigma: bool, connect: float) -> Tensor:
    """Symmetric k-NN graph with Gaussian weights, (B, L, L), from tokens (B, L, D)."""
    dist = torch.cdist(tokens, tokens, p=2)  # (B, L, L)
    sigma = dist.mean() if batch_sigma else dist.mean(dim=(1, 2), keepdim=True)
    weights = torch.exp(-dist**2 / (2 * sigma**2))
    k = min(knn, tokens.shape[1])
    values, neighbours = torch.topk(weights, k, dim=2, largest=True)
    batch = torch.arange(tokens.shape[0], device=tokens.device)[:, None, None]
    node = torch.arange(tokens.shape[1], device=tokens.device)[:, None]
    adjacency = torch.zeros_like(weights)
    adjacency[batch, node, neighbours] = values
    adjacency[batch, neighbours, node] = values  # symmetric
    if connect > 0:  # a small uniform weight keeps the graph connected: one zero eigenvalue, a defined ordering
        adjacency = adjacency + connect * values.mean(dim=(1, 2), keepdim=True)
    return adjacency


def _normalized_laplacian(adjacency: Tensor) -> Tensor:
    """I - Deg^-1/2 A Deg^-1/2, (B, L, L)."""
    inv_sqrt = adjacency.sum(dim=2).pow(-0.5)  # (B, L)
    eye = torch.eye(adjacency.shape[1], device=adjacency.device, dtype=adjacency.dtype)
    return eye - inv_sqrt[:, :, None] * adjacency * inv_sqrt[:, None, :]


EIGENSOLVERS = ('auto', 'dense', 'iterative')
DENSE_MAX_TOKENS = 32  # 'auto': dense eigh up to this many tokens (batched Jacobi on CUDA), iterative above


def _seed_projection(dim: int, columns: int, like: Tensor) -> Tensor:
    """A fixed, input-independent (dim, columns) projection: the iterative solver's start block. Built from cosines
    of incommensurate frequencies (generic, full rank) with plain tensor ops: no generator, no host-to-device copy,
    nothing cached, so it also traces under ``torch.compile``."""
    rows = torch.arange(1, dim + 1, device=like.device, dtype=torch.float64)
    cols = torch.arange(1, columns + 1, device=like.device, dtype=torch.float64)
    return torch.cos(rows[:, None] * cols[None, :] * 2.399963229728653 + cols[None, :] ** 0.5).to(like.dtype)


def _orthonormalize(block: Tensor) -> Tensor:
    """Orthonormal basis of the columns of (B, L, P) blocks: shifted Cholesky-QR twice, in float64 (P x P Gram
    matrices only; no QR and no host sync, unlike ``torch.linalg.qr``/``eigh`` on CUDA)."""
    x = block.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    length, width = x.shape[1:]
    eye = torch.eye(width, dtype=x.dtype, device=x.device)
    shift = 11 * (length * width + width * (width + 1)) * torch.finfo(x.dtype).eps * width  # >= ||x||^2 eps bound
    for extra in (shift, 0.0):
        lower = torch.linalg.cholesky_ex(x.transpose(1, 2) @ x + extra * eye)[0]
        x = torch.linalg.solve_triangular(lower.transpose(1, 2), x, upper=True, left=False)  # x <- x L^-T
    return x.to(block.dtype)


def _filtered_basis(operator: Tensor, start: Tensor, degree: int, iterations: int) -> Tensor:
    """An orthonormal basis (B, L, P) of the dominant invariant subspace of symmetric (B, L, L) matrices with spectrum
    in [-1, 1], by Chebyshev-filtered subspace iteration: a fixed number of batched matrix products, no host sync.

    Each iteration damps the spectrum between -1 and the block's lowest Rayleigh quotient with a Chebyshev polynomial
    of ``degree`` and re-orthonormalizes. Every step commutes with permutations of the tokens (the start block is a
    row-wise function of the tokens), so the result is permutation-equivariant like a dense ``eigh``.
    """
    basis = _orthonormalize(start)
    eye = torch.eye(operator.shape[1], device=operator.device, dtype=operator.dtype)
    for _ in range(iterations):
        # Damp [-1, cut]: cut = the lowest Rayleigh quotient of the block (>= its lowest Ritz value).
        cut = (basis * torch.bmm(operator, basis)).sum(dim=1).amin(dim=1).clamp(min=-0.99)
        half_width, centre = ((cut + 1) / 2)[:, None, None], ((cut - 1) / 2)[:, None, None]
        scaled = (operator - centre * eye) * (2 / half_width)  # 2 * (A - c) / e: one product per recurrence step
        previous, current = basis, torch.bmm(scaled, basis) / 2
        for _ in range(degree - 1):
            previous, current = current, torch.baddbmm(previous, scaled, current, beta=-1)
        basis = _orthonormalize(current)
    return basis


def _graph_subspace(tokens: Tensor, knn: int, block: int, degree: int, iterations: int) -> Tuple[Tensor, Tensor]:
    """The host-sync-free part of the iterative ordering (replayed as a CUDA graph per shape): the k-NN graph of the
    tokens (B, L, D), its normalized adjacency (I - Laplacian, spectrum in [-1, 1]), the filtered basis (B, L, P) and
    the operator projected on it (B, P, P), whose ``eigh`` (the Rayleigh-Ritz step) gives the eigenpairs."""
    adjacency = _knn_adjacency(tokens, knn, batch_sigma=False, connect=1e-6)
    degrees = adjacency.sum(dim=2)  # (B, L)
    inv_sqrt = degrees.rsqrt()
    normalized = inv_sqrt[:, :, None] * adjacency * inv_sqrt[:, None, :]
    # Start: sqrt(degree) (the exact top eigenvector) and a fixed projection of the tokens (row-wise: equivariant).
    start = torch.cat([degrees.sqrt()[:, :, None], tokens @ _seed_projection(tokens.shape[2], block - 1, tokens)],
                      dim=2)
    basis = _filtered_basis(normalized, start, degree, iterations)
    return basis, basis.transpose(1, 2) @ torch.bmm(normalized, basis)


def _subspace_cost(tokens: Tensor) -> int:
    """Elements of the (B, L, L) intermediates relative to the (B, L, D) tokens, times the ~8 of them alive at once."""
    return 8 * max(1, tokens.shape[1] // tokens.shape[2])


def solver_graphs(knn: int = 5, block: int = 32, degree: int = 16, iterations: int = 3,
                  enabled: bool = True) -> CudaGraphCache:
    """A per-shape CUDA-graph cache of the iterative ordering's sync-free part (pass it to :func:`spectral_order`)."""
    return CudaGraphCache(partial(_graph_subspace, knn=knn, block=block, degree=degree, iterations=iterations),
                          cost_factor=_subspace_cost, enabled=enabled)


@torch.no_grad()
def spectral_order(features: Tensor, top_k: int = 4, knn: int = 5, upstream_compat: bool = False,
                   return_details: bool = False, eigensolver: str = 'auto', block: int = 32, degree: int = 16,
                   iterations: int = 3, graphs: Optional[CudaGraphCache] = None):
    """Token orders from the spectrum of a k-NN graph over the tokens' features.

    Args:
        features: (B, D, H, W) features of the tokens.
        top_k: number of eigenvectors (after the first) that each give one order.
        knn: neighbours per token in the graph.
        upstream_compat: upstream's choices (batch-wide sigma, per-token sign fix, no connecting weight, the dense
            Laplacian built with diagonal-matrix products, dense eigh); otherwise per-image sigma and a sign per
            eigenvector.
        return_details: also return the eigenvalues and the selected eigenvectors (for tests and plots).
        eigensolver: ``'dense'`` (``torch.linalg.eigh``, O(L^3)), ``'iterative'`` (Chebyshev-filtered subspace
            iteration on a block of ``block`` vectors, ``iterations`` x ``degree`` matrix products), or ``'auto'``:
            dense up to ``DENSE_MAX_TOKENS`` tokens (and always in upstream mode), iterative above.
        graphs: a :func:`solver_graphs` cache (same knn/block/degree/iterations): on CUDA the iterative solver's
            sync-free part is then replayed as one CUDA graph per input shape instead of ~300 kernel launches.

    Returns:
        order: (B, L, top_k) int64; ``order[b, :, t]`` lists the token indices (raster order of the H x W grid)
        sorted by eigenvector t + 2. With fewer than top_k + 1 tokens the available eigenvectors are reused.
    """
    if eigensolver not in EIGENSOLVERS:
        raise ValueError(f'spectral_order: eigensolver must be one of {EIGENSOLVERS}, got {eigensolver!r}.')
    with torch.autocast(features.device.type, enabled=False):  # the graph and the eigensolver stay in float32
        return _spectral_order(features.float(), top_k, knn, upstream_compat, return_details, eigensolver, block,
                               degree, iterations, graphs)


def _spectral_order(features: Tensor, top_k: int, knn: int, upstream_compat: bool, return_details: bool,
                    eigensolver: str, block: int, degree: int, iterations: int, graphs: Optional[CudaGraphCache]):
    b, d, h, w = features.shape
    tokens = features.reshape(b, d, h * w).transpose(1, 2).float()  # (B, L, D)
    length = h * w
    if length == 1:
        order = torch.zeros(b, 1, top_k, dtype=torch.long, device=features.device)
        zeros = torch.zeros(b, 1, top_k, device=features.device)
        details = dict(eigenvalues=torch.zeros(b, 1, device=features.device), eigenvectors_before_sign_fix=zeros,
                       eigenvectors=zeros, sorted_eigenvectors=zeros)
        return (order, details) if return_details else order
    iterative = not upstream_compat and (eigensolver == 'iterative' or
                                         (eigensolver == 'auto' and length > DENSE_MAX_TOKENS))
    iterative = iterative and length > block
    if iterative:
        if graphs is not None and (graphs.fn.keywords != dict(knn=knn, block=block, degree=degree,
                                                              iterations=iterations)):
            raise ValueError(f'spectral_order: the CUDA-graph cache was made for {graphs.fn.keywords}, the call asks '
                             f'for knn={knn}, block={block}, degree={degree}, iterations={iterations}.')
        basis, projected = (graphs(tokens) if graphs is not None else
                            _graph_subspace(tokens, knn, block, degree, iterations))
        values, vectors = torch.linalg.eigh(projected)  # Rayleigh-Ritz, ascending
        eigenvalues, eigenvectors = 1 - values.flip(1), (basis @ vectors).flip(2)  # ascending Laplacian eigenvalues
    elif upstream_compat:
        adjacency = _knn_adjacency(tokens, knn, batch_sigma=True, connect=0.0)
        inv_sqrt = torch.diag_embed(adjacency.sum(dim=2).pow(-0.5))
        eye = torch.eye(length, device=features.device).unsqueeze(0).repeat(b, 1, 1)
        laplacian = eye - torch.bmm(torch.bmm(inv_sqrt, adjacency), inv_sqrt)
        eigenvalues, eigenvectors = torch.linalg.eigh(laplacian)  # ascending
    else:
        adjacency = _knn_adjacency(tokens, knn, batch_sigma=False, connect=1e-6)
        eigenvalues, eigenvectors = torch.linalg.eigh(_normalized_laplacian(adjacency))
    available = min(top_k, length - 1)
    columns = [1 + (t % available) for t in range(top_k)]
    selected = eigenvectors[:, :, columns]  # (B, L, top_k)
    raw = selected.clone()
    if upstream_compat:
        selected = selected * selected.mean(dim=2, keepdim=True).sign()  # per token (upstream)
    else:
        third = (selected**3).sum(dim=1, keepdim=True)  # per eigenvector; invariant to permuting the tokens
        selected = selected * torch.where(third < 0, -1.0, 1.0)
    # Upstream's sort call in upstream mode (ties, e.g. eigenvectors that vanish on a graph component, fall as the
    # sort implementation breaks them, so CPU and GPU may differ there as upstream's do); a stable sort otherwise.
    sorted_vectors, order = torch.sort(selected, dim=1) if upstream_compat else torch.sort(selected, dim=1, stable=True)
    if return_details:
        return order, dict(eigenvalues=eigenvalues, eigenvectors_before_sign_fix=raw, eigenvectors=selected,
                           sorted_eigenvectors=sorted_vectors)
    return order


class ScanIndex(NamedTuple):
    """A stage's scan order as the index maps of :func:`vssm.ops.gather_tokens` / :func:`vssm.ops.scatter_tokens`,
    built once per stage by :func:`scan_index` (each (B, 2T, L) int64).

    ``scan``: the raster token read at each step of the 2T sequences (the T orders, then each reversed).
    ``merge``: where step i of each sequence is added back (equal to ``scan`` when the orders are permutations).
    ``inverse``: the inverse permutations of the rows of ``merge``; also those of ``scan`` when ``exact_inverse``.
    """
    scan: Tensor
    merge: Tensor
    inverse: Tensor
    exact_inverse: bool


def _with_reversed(index: Tensor) -> Tensor:
    """(B, L, T) or (B, T, L) ... -> (B, 2T, L): the rows, then each row reversed."""
    return torch.cat([index, index.flip(-1)], dim=1)


def scan_index(order: Tensor, upstream_compat: bool = False) -> ScanIndex:
    """The index maps of the sequences of ``order`` (B, L, T) (raster token at each step).

    In the fixed mode every order is a permutation: the merge puts each step back where it was read, and both ops
    use the inverse permutations. In upstream mode an order can repeat and skip tokens (after an odd width); the merge
    then reproduces upstream's: raster token p takes step ``argsort(order)[p]`` of each sequence (upstream's argsort
    call, whose ties the sort implementation breaks), i.e. step i goes to raster position ``rank[i]``, where ``rank``
    is the inverse of that argsort. The scan's backward is then the scatter-add of its own index (never the merge).
    """
    length = order.shape[1]
    if upstream_compat:  # upstream's call on its (B, L, T) layout: ties broken as the sort implementation breaks them
        inverse = torch.argsort(order, dim=1).transpose(1, 2)  # (B, T, L)
        order = order.transpose(1, 2)
        rank = inverse_permutation(inverse)
    else:
        order = order.transpose(1, 2)  # (B, T, L)
        inverse, rank = inverse_permutation(order), order
    # A reversed sequence holds at step j what the forward one holds at step L - 1 - j.
    inverse = torch.cat([inverse, length - 1 - inverse], dim=1)
    return ScanIndex(_with_reversed(order), _with_reversed(rank), inverse, exact_inverse=not upstream_compat)


def equivariant_pool(x: Tensor) -> Tensor:
    """Stride-2 average pooling that commutes with 90-degree rotations: 2x2 windows on even sides, 3x3 windows
    centred on the even pixels of odd sides (padding not counted). (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""
    h, w = x.shape[-2:]
    kh, kw = (2 if h % 2 == 0 else 3), (2 if w % 2 == 0 else 3)
    return F.avg_pool2d(x, (kh, kw), stride=2, padding=(kh // 2 if kh == 3 else 0, kw // 2 if kw == 3 else 0),
                        count_include_pad=False)


def pooled_order(fields: Tensor) -> Tuple[Tensor, Tensor]:
    """The next stage's order in the fixed mode: the stage's eigenvector fields (B, T, H, W) pooled like the features
    (``equivariant_pool``), each sorted. Returns the order (B, L', T) and the pooled fields."""
    pooled = equivariant_pool(fields)
    return torch.sort(pooled.flatten(2).transpose(1, 2), dim=1, stable=True)[1], pooled


@torch.no_grad()
def propagate_order_upstream(order: Tensor, kept: Tensor, width: int) -> Tensor:
    """Upstream's stage-to-stage order: the previous order restricted to the kept (pooled) tokens, re-indexed.

    Args:
        order: (B, Lp, T) order on the previous grid.
        kept: (B, M) flat indices (previous grid) of the tokens the stride-2 pooling kept, in raster order.
        width: width of the new grid. Upstream converts a previous index i to (i // 2w // 2) * w + (i % 2w) // 2,
            i.e. it assumes the previous width is exactly 2w; after an odd width the result is not a permutation.

    Returns:
        (B, M, T) int64. A previous token present twice counts at its later position; kept tokens absent from the
        previous order go last, in the order upstream's (unstable) argsort leaves them.
    """
    b, lp, t = order.shape
    positions = torch.full((b, max(lp, int(kept.max()) + 1)), lp + 1, dtype=torch.long, device=order.device)
    result = []
    for i in range(t):
        pos = torch.full_like(positions, -1).scatter_reduce(
            1, order[:, :, i], torch.arange(lp, device=order.device).expand(b, -1), reduce='amax')
        pos = torch.where(pos < 0, positions, pos)  # absent: lp + 1
        ranked = torch.gather(kept, 1, torch.argsort(torch.gather(pos, 1, kept), dim=1))  # upstream's call
        result.append((ranked // (2 * width) // 2) * width + (ranked % (2 * width)) // 2)
    return torch.stack(result, dim=2)
