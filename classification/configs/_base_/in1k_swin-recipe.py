# ImageNet-1k recipe shared by the vssm classification configs (the upstream papers' Swin-style recipe): AdamW,
# lr 1e-3 at a total batch of 1024 (8 x 128), weight decay 0.05, 300 epochs, cosine with 20 warm-up epochs,
# RandAugment / Mixup 0.8 / CutMix 1.0 / RandomErasing 0.25, label smoothing 0.1, gradient clipping at 5.
# A leaf config sets model.backbone (type, arch, drop_path_rate) and model.head.in_channels.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
    '../../../configs/_base_/custom_imports.py',
]

model = dict(
    type='ImageClassifier',
    backbone=dict(),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        init_cfg=dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.),
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        cal_acc=False),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

# No weight decay on norms, biases, 1-D parameters and the SSM's A and D (as upstream).
optim_wrapper = dict(
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(custom_keys={'.A_logs': dict(decay_mult=0.0), '.Ds': dict(decay_mult=0.0)}))

# Flip test-time augmentation for `tools/dist_test.sh ... --tta`.
tta_model = dict(type='AverageClsScoreTTA')
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='TestTimeAug',
         transforms=[[dict(type='RandomFlip', prob=0.), dict(type='RandomFlip', prob=1.)], [dict(type='PackInputs')]]),
]
