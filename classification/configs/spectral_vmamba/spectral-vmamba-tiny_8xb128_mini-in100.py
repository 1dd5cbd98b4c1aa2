# Spectral VMamba-T on mini-ImageNet (100 classes, 224x224), upstream's own setting. Data in ImageNet folder layout:
# data/mini-imagenet/{train,val}/<wnid>/*.JPEG (one folder per class; the class list is read from the folders).
_base_ = './spectral-vmamba-tiny_8xb128_in1k.py'

data_root = 'data/mini-imagenet'
data_preprocessor = dict(num_classes=100)
model = dict(head=dict(num_classes=100))
train_dataloader = dict(
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline={{_base_.train_pipeline}}))
val_dataloader = dict(
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline={{_base_.test_pipeline}}))
test_dataloader = val_dataloader
