# Mask R-CNN with a Spectral VMamba-T backbone, COCO 1x (12 epochs) on mmdet's Swin-T recipe (AdamW lr 1e-4, weight
# decay 0.05, 2 images per GPU on 8 GPUs).
# The backbone's strides are 16, 32, 64, 128 (the RFN patchifies at 16), not Swin's 4..32, so the FPN, the RPN's
# anchors and the RoI extractors are fitted to them: FPN levels at strides 16..256 (num_outs=5, the last by max
# pooling), anchor scale 2 so the anchor sizes stay 32..512 as in the 4..64-stride original, and RoI features taken
# from the strides 16..128 (RoIs still assigned to levels by their size). Inputs are padded to multiples of 32.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', '../../../configs/_base_/custom_imports.py']

# ImageNet weights: converted upstream ones (tools/model_converters/spectral_vmamba_to_vssm.py) or our training.
pretrained = 'checkpoints/spectral-vmamba-tiny_8xb128_in1k.pth'
strides = [16, 32, 64, 128]
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.SpectralVMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[256, 512, 1024, 2048], num_outs=5),
    rpn_head=dict(anchor_generator=dict(scales=[2], strides=strides + [256])),
    roi_head=dict(
        bbox_roi_extractor=dict(featmap_strides=strides),
        mask_roi_extractor=dict(featmap_strides=strides)))

optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.A_logs': dict(decay_mult=0.), '.Ds': dict(decay_mult=0.)}))
