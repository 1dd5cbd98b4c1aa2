"""Pieces shared by the Triton kernels of vssm.ops: channel-major (B, C, L) maps normalized per pixel.

A program takes ``BLOCK_L`` consecutive pixels of the flattened B * L axis (runs of consecutive addresses per channel,
across image boundaries, so small maps still give many programs) and the channels in one tile (up to
``SINGLE_MAX_C``) or in chunks of ``BLOCK_C`` whose statistics are merged with Chan's formula (numerically stable).
"""
import torch
import triton
import triton.language as tl

SINGLE_MAX_C = 256  # channels held in registers in one tile (padded to a power of two)
NUM_WARPS = 8


def tiles(channels: int, elements: int):
    """(single tile, BLOCK_C, BLOCK_L) for a channel count: about ``elements`` per tile and 16 to 64 pixels per row
    (enough programs for small maps; 64+ contiguous bytes per channel row)."""
    if channels <= SINGLE_MAX_C:
        block_c = triton.next_power_of_2(channels)
        return True, block_c, min(64, max(16, elements // block_c))
    return False, 64, 32


@triton.jit
def flat_pixels(pid, n_c, length, n_pixels, BLOCK_L: tl.constexpr):
    """The program's pixels: flat index on the B * L axis, mask, batch, pixel in the image, and the offset of
    channel 0 in a channel-major (B, C, L) map (channel c adds c * L)."""
    offs_p = pid.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_p = offs_p < n_pixels
    batch, pixel = offs_p // length, offs_p % length
    return offs_p, mask_p, batch, pixel, batch * n_c * length + pixel


@triton.jit
def chan_merge(count, mean, m2, x, mask):
    """Running (count, mean, M2) per pixel merged with a [channels, pixels] chunk ``x`` (masked entries ignored)."""
    n_b = tl.sum(mask.to(tl.float32), 0)
    mean_b = tl.sum(tl.where(mask, x, 0.), 0) / tl.maximum(n_b, 1.)
    xc = tl.where(mask, x - mean_b[None, :], 0.)
    total = count + n_b
    delta = mean_b - mean
    mean += delta * n_b / tl.maximum(total, 1.)
    m2 += tl.sum(xc * xc, 0) + delta * delta * count * n_b / tl.maximum(total, 1.)
    return total, mean, m2


@triton.jit
def round_to(x, LOW: tl.constexpr, dtype: tl.constexpr):
    """x rounded to the 16-bit ``dtype`` (as a reference op computing in it would) when ``LOW``, else unchanged."""
    if LOW:
        x = x.to(dtype).to(tl.float32)
    return x


def low_precision(t) -> bool:
    """Whether a tensor is 16-bit (the kernels then round their intermediate steps to its dtype)."""
    return t.dtype in (torch.float16, torch.bfloat16)


ROW_TILE = 1024  # elements per program of the kernels over the rows of a (B, C, L) map
MAX_ROW_BLOCK, MIN_ROW_BLOCK = 1024, 16


def row_tiles(rows: int, length: int):
    """(ROWS, BLOCK, grid, warps) for kernels over the ``rows`` (image, channel) rows of ``length`` pixels of a
    (B, C, L) map: BLOCK pixels of a row (its length padded to a power of two, within [MIN_ROW_BLOCK,
    MAX_ROW_BLOCK]) times ROWS consecutive rows, about ``ROW_TILE`` elements per program (short rows, e.g. 7x7 maps,
    share a program). The grid's first axis walks the rows (it allows 2^31 programs), the second the pixel blocks."""
    block = min(MAX_ROW_BLOCK, max(MIN_ROW_BLOCK, triton.next_power_of_2(length)))
    n_rows = max(1, ROW_TILE // block)
    return n_rows, block, (triton.cdiv(rows, n_rows), triton.cdiv(length, block)), max(1, min(4, n_rows * block // 256))


@triton.jit
def row_tile(n_rows, length, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The program's tile of :func:`row_tiles`: (pixel block, rows = b * C + c [ROWS], row mask, [ROWS, BLOCK] mask,
    offsets)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pid_l = tl.program_id(1)
    pix = pid_l * BLOCK + tl.arange(0, BLOCK)
    mask_r = rows < n_rows
    return pid_l, rows, mask_r, mask_r[:, None] & (pix < length)[None, :], rows[:, None] * length + pix[None, :]
