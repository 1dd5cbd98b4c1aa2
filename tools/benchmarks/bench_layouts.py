"""Layout micro-benchmark: the memory-bound pieces of the Spatial-Mamba / VMamba blocks in the layouts they can be
written in (which copy, which cuDNN/ATen kernel), at the T models' stage-1 shapes, batch 128.

    python tools/benchmarks/bench_layouts.py [--batch 128] [--iters 20]

Each case prints its forward time (no autograd) and forward+backward time, in fp32 (TF32 on) and under bf16 autocast,
and the variants of one piece side by side, so the block code can use the fastest form.
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F


def timeit(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run(name, make, body, iters, dtype):
    """make() -> inputs (leaf tensors requiring grad); body(*inputs) -> output."""
    ac = torch.autocast('cuda', torch.bfloat16) if dtype == 'bf16' else contextlib.nullcontext()
    inputs = make()

    def fwd():
        with torch.no_grad(), ac:
            body(*inputs)

    def fwdbwd():
        with ac:
            out = body(*inputs)
        out.float().sum().backward() if out.dtype != torch.float32 else out.sum().backward()
        for t in inputs:
            t.grad = None
    try:
        f = timeit(fwd, iters)
        fb = timeit(fwdbwd, iters)
        print(f'{name:58s} {dtype:5s} fwd {f:7.3f} ms   fwd+bwd {fb:7.3f} ms', flush=True)
    except Exception as e:  # noqa: BLE001
        print(f'{name:58s} {dtype:5s} failed: {type(e).__name__}: {str(e)[:120]}', flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--iters', type=int, default=20)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = 'cuda'
    B, H, W = a.batch, 56, 56
    L = H * W
    g = lambda *s: torch.randn(*s, device=dev, requires_grad=True)  # noqa: E731
    try:
        import vssm.ops as vops
        from vssm.ops import dwconv2d as vdw
    except Exception:  # noqa: BLE001
        vops = None
    for dtype in ('fp32', 'bf16'):
        # --- Spatial-Mamba cpe: x + dwconv3x3(x), x channels-last (B, H, W, C=64)
        C = 64
        run('SM cpe: NHWC x + conv(permute) [current]', lambda: (g(B, H, W, C), g(C, 1, 3, 3), g(C)),
            lambda x, w, b: x + F.conv2d(x.permute(0, 3, 1, 2), w, b, padding=1, groups=C).permute(0, 2, 3, 1),
            a.iters, dtype)
        run('SM cpe: NHWC, weight channels_last', lambda: (g(B, H, W, C), g(C, 1, 3, 3), g(C)),
            lambda x, w, b: x + F.conv2d(x.permute(0, 3, 1, 2), w.contiguous(memory_format=torch.channels_last), b,
                                         padding=1, groups=C).permute(0, 2, 3, 1), a.iters, dtype)
        run('SM cpe: NCHW x + conv(x)', lambda: (g(B, C, H, W), g(C, 1, 3, 3), g(C)),
            lambda x, w, b: x + F.conv2d(x, w, b, padding=1, groups=C), a.iters, dtype)
        if vops is not None:
            run('SM cpe: NCHW x + vssm dwconv2d(x)', lambda: (g(B, C, H, W), g(C, 1, 3, 3), g(C)),
                lambda x, w, b: x + vops.dwconv2d(x, w, b, backend="cuda"), a.iters, dtype)
        # --- Spatial-Mamba local conv on the x half of in_proj's output (B, H, W, 2D), D=128 -> u (B, D, L)
        D = 128
        run('SM local: slice.permute -> conv -> silu -> u [current]', lambda: (g(B, H, W, 2 * D), g(D, 1, 3, 3), g(D)),
            lambda xz, w, b: F.silu(F.conv2d(xz[..., :D].permute(0, 3, 1, 2), w, b, padding=1,
                                             groups=D)).flatten(2).contiguous(), a.iters, dtype)
        run('SM local: slice.permute.contiguous -> conv', lambda: (g(B, H, W, 2 * D), g(D, 1, 3, 3), g(D)),
            lambda xz, w, b: F.silu(F.conv2d(xz[..., :D].permute(0, 3, 1, 2).contiguous(), w, b, padding=1,
                                             groups=D)).flatten(2), a.iters, dtype)
        run('SM local: slice.contiguous (NHWC) -> conv w CL', lambda: (g(B, H, W, 2 * D), g(D, 1, 3, 3), g(D)),
            lambda xz, w, b: F.silu(F.conv2d(xz[..., :D].contiguous().permute(0, 3, 1, 2),
                                             w.contiguous(memory_format=torch.channels_last), b, padding=1,
                                             groups=D)).flatten(2).contiguous(), a.iters, dtype)
        if vops is not None:
            run('SM local: permute.contiguous -> vssm dwconv2d', lambda: (g(B, H, W, 2 * D), g(D, 1, 3, 3), g(D)),
                lambda xz, w, b: F.silu(vops.dwconv2d(xz[..., :D].permute(0, 3, 1, 2).contiguous(), w, b,
                                                      backend="cuda")).flatten(2), a.iters, dtype)
        # --- LayerNorm over C
        run('LN NHWC (B, L, 64) F.layer_norm', lambda: (g(B, H, W, C), g(C), g(C)),
            lambda x, w, b: F.layer_norm(x, (C, ), w, b), a.iters, dtype)
        C2 = 96
        run('LN2d NCHW (B, 96, H, W) permute-LN-permute [VMamba]', lambda: (g(B, C2, H, W), g(C2), g(C2)),
            lambda x, w, b: F.layer_norm(x.permute(0, 2, 3, 1), (C2, ), w, b).permute(0, 3, 1, 2), a.iters, dtype)
        run('LN2d NCHW manual mean/var', lambda: (g(B, C2, H, W), g(C2), g(C2)),
            lambda x, w, b: ((x - x.mean(1, keepdim=True)) * torch.rsqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
                             * w[:, None, None] + b[:, None, None]), a.iters, dtype)
        # --- Linear2d (1x1 conv) on NCHW (B, 96, H, W) -> 192*2... VMamba-T in_proj 96 -> 192
        run('Linear2d: conv2d 1x1 NCHW [current]', lambda: (g(B, C2, H, W), g(2 * C2, C2)),
            lambda x, w: F.conv2d(x, w[:, :, None, None]), a.iters, dtype)
        run('Linear2d: matmul W @ x.view(B, C, L)', lambda: (g(B, C2, H, W), g(2 * C2, C2)),
            lambda x, w: torch.matmul(w, x.flatten(2)).view(B, -1, H, W), a.iters, dtype)
        run('Linear2d: conv2d 1x1 on channels_last input', lambda: (g(B, H, W, C2), g(2 * C2, C2)),
            lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w[:, :, None, None]), a.iters, dtype)
        run('Linear NHWC F.linear (Swin-like)', lambda: (g(B, H, W, C2), g(2 * C2, C2)),
            lambda x, w: F.linear(x, w), a.iters, dtype)
        # --- VMamba x_proj: (B, K=4, D=192, L) -> (B, K, 6+32, L)
        K, Dv, R = 4, 192, 6
        run('x_proj: grouped conv1d [current]', lambda: (g(B, K, Dv, L), g(K, R + 32, Dv)),
            lambda xs, w: F.conv1d(xs.reshape(B, K * Dv, L), w.reshape(-1, Dv, 1), groups=K), a.iters, dtype)
        run('x_proj: matmul(w, xs)', lambda: (g(B, K, Dv, L), g(K, R + 32, Dv)),
            lambda xs, w: torch.matmul(w, xs), a.iters, dtype)
        run('x_proj: einsum bkdl,kcd->bkcl', lambda: (g(B, K, Dv, L), g(K, R + 32, Dv)),
            lambda xs, w: torch.einsum('bkdl,kcd->bkcl', xs, w), a.iters, dtype)
        run('dt_proj: einsum bkrl,kdr->bkdl [current]', lambda: (g(B, K, R, L), g(K, Dv, R)),
            lambda d, w: torch.einsum('bkrl,kdr->bkdl', d, w), a.iters, dtype)
        run('dt_proj: matmul(w, dts)', lambda: (g(B, K, R, L), g(K, Dv, R)),
            lambda d, w: torch.matmul(w, d), a.iters, dtype)
        # --- SM x_proj (B, D=128, L) -> (B, 4+2, L)
        run('SM x_proj: conv1d [current]', lambda: (g(B, D, L), g(6, D)),
            lambda u, w: F.conv1d(u, w[:, :, None]), a.iters, dtype)
        run('SM x_proj: matmul(w, u)', lambda: (g(B, D, L), g(6, D)),
            lambda u, w: torch.matmul(w, u), a.iters, dtype)
        # copy floor
        run('copy (B, L, 128) (reference: one map read+write)', lambda: (g(B, H, W, D), ),
            lambda x: x.clone(), a.iters, dtype)


if __name__ == '__main__':
    main()
