# Baseline: UPerNet with mmpretrain's Swin-T, ADE20K 512x512, 160k iterations on mmseg's Swin-T recipe, exactly as
# the vssm T configs (drop path 0.2 like theirs; mmseg's own Swin-T config uses 0.3). `--tta`: multi-scale + flip.
# Small feature maps are padded to the window size, as mmseg's own Swin does.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '../../../configs/_base_/custom_imports.py',
]

pretrained = 'checkpoints/swin-tiny_8xb128_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.SwinTransformer',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        pad_small_map=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
