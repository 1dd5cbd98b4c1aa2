# Demo override for every segmentation config, applied by `tools/train.py` / `tools/test.py` with `--demo`
# (merged on top of the config): the 128x128 shapes data of `tools/make_demo_data.py` in ADE20K layout
# (5 classes after reduce_zero_label), a short schedule, no pretrained weights. `--tta` keeps mmseg's
# multi-scale (0.5-1.75) + flip test-time augmentation.
data_root = 'data/demo/ade/ADEChallengeData2016'
metainfo = dict(classes=('background', 'circle', 'square', 'triangle', 'cross'),
                palette=[(0, 0, 0), (220, 20, 60), (0, 128, 255), (0, 200, 0), (255, 160, 0)])
crop_size = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
               seg_map_suffix='.png', reduce_zero_label=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(init_cfg=None),
    decode_head=dict(num_classes=5),
    auxiliary_head=dict(num_classes=5))

train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=False,
    dataset=dict(_delete_=True, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
                 pipeline=train_pipeline, **dataset))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=False,
    dataset=dict(_delete_=True, data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
                 pipeline=test_pipeline, **dataset))
test_dataloader = val_dataloader

train_cfg = dict(max_iters=40, val_interval=40)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=10),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=10, end=40),
]
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(by_epoch=False, interval=40, max_keep_ckpts=1))
randomness = dict(seed=0)
