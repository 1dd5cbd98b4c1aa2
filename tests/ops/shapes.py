"""The exact scan and fusion shapes of the T/S/B models at their task resolutions (for GPU tests and benchmarks)."""
# Stage grids (H, W) at stride 4, 8, 16, 32 for each task's input size.
TASK_GRIDS = {
    'cls224': [(56, 56), (28, 28), (14, 14), (7, 7)],
    'seg512': [(128, 128), (64, 64), (32, 32), (16, 16)],
    'det1333x800': [(200, 336), (100, 168), (50, 84), (25, 42)],  # 800 x 1344 after padding to 32
}
# Inner (SSM) widths per stage.
SPATIAL_MAMBA_D = {'tiny': [128, 256, 512, 1024], 'small': [128, 256, 512, 1024], 'base': [192, 384, 768, 1536]}
VMAMBA_D = {'tiny': [96, 192, 384, 768], 'small': [192, 384, 768, 1536], 'base': [256, 512, 1024, 2048]}
VMAMBA_K = 4
# Spectral VMamba: stage grids at stride 16..128 (odd sides rounded up by its pooling), SSM width 2 x block width,
# K = 2 x top_k = 8 sequences (the four spectral orders and their reversals).
SPECTRAL_GRIDS = {
    'cls224': [(14, 14), (7, 7), (4, 4), (2, 2)],
    'seg512': [(32, 32), (16, 16), (8, 8), (4, 4)],
    'det1333x800': [(50, 84), (25, 42), (13, 21), (7, 11)],
}
SPECTRAL_D = [512, 1024, 2048, 4096]  # T, S and B alike
SPECTRAL_K = 8


def scan_cases():
    """(form, size, task, stage, D_total, groups, L) for every stage of every model and task."""
    cases = []
    for size in ('tiny', 'small', 'base'):
        for task, grids in TASK_GRIDS.items():
            for stage, (h, w) in enumerate(grids):
                cases.append(('state', size, task, stage, SPATIAL_MAMBA_D[size][stage], 1, h * w))
                cases.append(('output', size, task, stage, VMAMBA_K * VMAMBA_D[size][stage], VMAMBA_K, h * w))
    for task, grids in SPECTRAL_GRIDS.items():
        for stage, (h, w) in enumerate(grids):
            cases.append(('output', 'spectral', task, stage, SPECTRAL_K * SPECTRAL_D[stage], SPECTRAL_K, h * w))
    return cases


def fusion_cases():
    """(size, task, stage, D, H, W) of Spatial-Mamba's state fusion."""
    return [(size, task, stage, SPATIAL_MAMBA_D[size][stage], h, w) for size in ('tiny', 'small', 'base')
            for task, grids in TASK_GRIDS.items() for stage, (h, w) in enumerate(grids)]
