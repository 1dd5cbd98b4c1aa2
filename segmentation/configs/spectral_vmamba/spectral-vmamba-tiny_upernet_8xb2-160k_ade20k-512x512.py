# UPerNet with a Spectral VMamba-T backbone, ADE20K 512x512, 160k iterations on mmseg's Swin-T recipe
# (AdamW lr 6e-5, weight decay 0.01, poly schedule, 2 images per GPU on 8 GPUs). `--tta`: multi-scale + flip.
# The backbone's strides are 16..128 (UPerNet fuses any strides: it resizes every level to the first one's size);
# test images are padded to multiples of 16, the RFN's patch size, and the prediction is cropped back.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    '../../../configs/_base_/custom_imports.py',
]

pretrained = 'checkpoints/spectral-vmamba-tiny_8xb128_in1k.pth'
model = dict(
    data_preprocessor=dict(test_cfg=dict(size_divisor=16)),
    backbone=dict(
        _delete_=True,
        type='mmpretrain.SpectralVMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
    auxiliary_head=dict(in_channels=1024))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.A_logs': dict(decay_mult=0.), '.Ds': dict(decay_mult=0.)}))
