# Every task config inherits this: importing vssm registers its backbones in mmpretrain's MODELS.
custom_imports = dict(imports=['vssm'], allow_failed_imports=False)
