# Demo override for every detection config, applied by `tools/train.py` / `tools/test.py` with `--demo`
# (merged on top of the config): the 160x128 shapes data of `tools/make_demo_data.py` in COCO layout
# (4 classes, polygon masks), a short iteration-based schedule, no pretrained weights.
data_root = 'data/demo/coco/'
metainfo = dict(classes=('circle', 'square', 'triangle', 'cross'),
                palette=[(220, 20, 60), (0, 128, 255), (0, 200, 0), (255, 160, 0)])
img_scale = (160, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]

model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes=4), mask_head=dict(num_classes=4)))

train_dataloader = dict(
    batch_size=2,
    num_workers=1,
    persistent_workers=False,
    sampler=dict(_delete_=True, type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2,
    num_workers=1,
    persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/instances_val2017.json',
                 data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=40, val_interval=40)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=False, begin=10, end=40),
]
auto_scale_lr = dict(enable=False)
default_hooks = dict(logger=dict(interval=5, log_metric_by_epoch=False),
                     checkpoint=dict(by_epoch=False, interval=40, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
