# Baseline: mmpretrain's Swin-T on the same ImageNet-1k recipe as the vssm classification configs
# (classification/configs/_base_/in1k_swin-recipe.py), for comparisons under one schedule
# (the learning runs in docs/benchmarks.md).
# As mmpretrain's swin-tiny_16xb64_in1k.py (drop path 0.2) except pad_small_map=True: maps smaller than the 7x7
# window (4x4 and 2x2 from the 64 px demo images) are padded, as in the detection and segmentation baselines; at
# 224 px it keeps the shifted windows of the last stage (7x7), which mmpretrain's default switches off there.
_base_ = '../_base_/in1k_swin-recipe.py'

model = dict(backbone=dict(type='SwinTransformer', arch='tiny', img_size=224, drop_path_rate=0.2, pad_small_map=True),
             head=dict(in_channels=768))
