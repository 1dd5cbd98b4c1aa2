# Demo override for every classification config, applied by `tools/train.py` / `tools/test.py` with `--demo`
# (merged on top of the config): the 64x64 shapes data of `tools/make_demo_data.py` in ImageNet folder layout,
# 4 classes, a short iteration-based schedule, no pretrained weights. Change the length with --cfg-options.
data_root = 'data/demo/imagenet'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=64, crop_ratio_range=(0.6, 1.0), backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]

data_preprocessor = dict(num_classes=4)
model = dict(backbone=dict(init_cfg=None), head=dict(num_classes=4), train_cfg=dict(_delete_=True))

train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=False,
    sampler=dict(_delete_=True, type='InfiniteSampler', shuffle=True),
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='val', pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(_delete_=True, type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator
tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='TestTimeAug',
         transforms=[[dict(type='RandomFlip', prob=0.), dict(type='RandomFlip', prob=1.)], [dict(type='PackInputs')]]),
]

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=100, val_interval=100)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=False, begin=10, end=100),
]
auto_scale_lr = dict(enable=False)
default_hooks = dict(logger=dict(interval=5, log_metric_by_epoch=False),
                     checkpoint=dict(by_epoch=False, interval=100, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
