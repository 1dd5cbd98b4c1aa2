# UPerNet with a Spatial-Mamba-T backbone, ADE20K 512x512, 160k iterations on mmseg's Swin-T recipe
# (AdamW lr 6e-5, weight decay 0.01, poly schedule, 2 images per GPU on 8 GPUs).
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '../../../configs/_base_/custom_imports.py',
]

pretrained = 'checkpoints/spatial-mamba-tiny_8xb128_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.SpatialMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.A_logs': dict(decay_mult=0.), '.Ds': dict(decay_mult=0.)}))

# Multi-scale + flip test-time augmentation (the upstream mIoU (MS) protocol) for `tools/dist_test.sh ... --tta`
# comes from mmseg's ADE20K base: tta_model = SegTTAModel, tta_pipeline with ratios 0.5-1.75 and flips.
