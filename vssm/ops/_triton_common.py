"""Pieces shared by the Triton kernels of vssm.ops: channel-major (B, C, L) maps normalized per pixel.

A program takes ``BLOCK_L`` consecutive pixels of the flattened B * L axis (runs of consecutive addresses per channel,
across image boundaries, so small maps still give many programs) and the channels in one tile (up to
``SINGLE_MAX_C``) or in chunks of ``BLOCK_C`` whose statistics are merged with Chan's formula (numerically stable).
"""
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


MAX_ROW_BLOCK, MIN_ROW_BLOCK = 1024, 64


def row_block(length: int) -> int:
    """Pixels per program for kernels over the (image, channel) rows of a (B, C, L) map: the row's length padded to a
    power of two, within [MIN_ROW_BLOCK, MAX_ROW_BLOCK]; and the warps for it."""
    block = min(MAX_ROW_BLOCK, max(MIN_ROW_BLOCK, triton.next_power_of_2(length)))
    return block, max(1, min(4, block // 256))


@triton.jit
def row_tile(length, BLOCK: tl.constexpr):
    """The program's pixels in a (B, C, L) map (grid: pixel blocks, rows): (pixel block, row = b * C + c, mask,
    offsets)."""
    pid_l, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    pix = pid_l * BLOCK + tl.arange(0, BLOCK)
    return pid_l, row, pix < length, row * length + pix
