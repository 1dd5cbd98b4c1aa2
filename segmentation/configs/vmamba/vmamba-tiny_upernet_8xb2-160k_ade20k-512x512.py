# UPerNet with a VMamba-T backbone, ADE20K 512x512, 160k iterations on mmseg's Swin-T recipe
# (AdamW lr 6e-5, weight decay 0.01, poly schedule, 2 images per GPU on 8 GPUs). `--tta`: multi-scale + flip.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '../../../configs/_base_/custom_imports.py',
]

pretrained = 'checkpoints/vmamba-tiny_8xb128_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.VMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.A_logs': dict(decay_mult=0.), '.Ds': dict(decay_mult=0.)}))
