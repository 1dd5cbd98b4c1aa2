"""VMamba specifics on CPU: cross-scan/merge, Linear2d checkpoints, legacy v0 keys, SSM init.
(The contract shared with the other families, sizes and upstream fixtures: test_backbones.py.)"""
import torch
from fixture_utils import load_manifest
from models.families import BY_NAME, build_classifier, on_meta

from vssm.models import VMamba
from vssm.models.layers import Linear2d
from vssm.models.vmamba import convert_upstream_state_dict, cross_merge, cross_scan, cross_scan_index


def test_cross_scan_orders_and_merge_is_its_adjoint():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    xs = cross_scan(x)  # (B, 4, D, L)
    assert xs.shape == (2, 4, 3, 20)
    assert xs[0, 0, 0, :6].tolist() == [0, 1, 2, 3, 4, 5]  # row-major
    assert xs[0, 1, 0, :5].tolist() == [0, 5, 10, 15, 1]  # column-major
    assert torch.equal(xs[:, 2], xs[:, 0].flip(-1)) and torch.equal(xs[:, 3], xs[:, 1].flip(-1))
    torch.testing.assert_close(cross_merge(xs, 4, 5), 4 * x)  # every direction puts each token back in place
    y = torch.randn_like(xs)  # <scan(x), y> == <x, merge(y)>
    torch.testing.assert_close((xs * y).sum(), (x * cross_merge(y, 4, 5)).sum())


def test_cross_scan_and_merge_gradients_are_each_others_forward():
    """The custom backwards (cross-merge for the scan, cross-scan for the merge) against autograd through plain
    flips and adds, on a non-square map; and the traced (plain-op) path gives the same values."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, 20, dtype=torch.float64, requires_grad=True)

    def plain_scan(t):
        rows, cols = t.flatten(2), t.transpose(2, 3).flatten(2)
        return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)

    def plain_merge(t):
        rows, cols = t[:, 0] + t[:, 2].flip(-1), t[:, 1] + t[:, 3].flip(-1)
        return rows.view(2, 3, 4, 5) + cols.view(2, 3, 5, 4).transpose(2, 3)

    for ours, plain, inp in ((cross_scan, plain_scan, x), (lambda t: cross_merge(t, 4, 5), plain_merge, y)):
        out = ours(inp)
        torch.testing.assert_close(out, plain(inp))
        grad = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, inp, grad)[0],
                                   torch.autograd.grad(plain(inp), inp, grad)[0])
    traced = torch.jit.trace(lambda t: cross_merge(cross_scan(t), 4, 5), (x.detach(), ))
    torch.testing.assert_close(traced(x.detach()), 4 * x.detach())
    index, inverse = cached = cross_scan_index(4, 5, x.device)
    assert index.shape == inverse.shape == (1, 4, 20) and index[0, 1, :5].tolist() == [0, 5, 10, 15, 1]
    assert torch.equal(index.gather(2, inverse), torch.arange(20).expand(1, 4, 20))
    assert cross_scan_index(4, 5, x.device) is cached
    from vssm.models import vmamba
    for size in range(1, 40):  # bounded: the oldest shapes leave
        cross_scan_index(size, 3, x.device)
    assert len(vmamba._INDEX_CACHE) == vmamba._INDEX_CACHE_SIZE and (1, 3, x.device) not in vmamba._INDEX_CACHE


def test_linear2d_accepts_4d_weights_and_missing_keys_do_not_crash():
    layer = Linear2d(3, 5)
    weight = torch.randn(5, 3, 1, 1)
    layer.load_state_dict({'weight': weight, 'bias': torch.zeros(5)})
    torch.testing.assert_close(layer.weight, weight.flatten(1))
    result = layer.load_state_dict({'bias': torch.zeros(5)}, strict=False)  # upstream raised KeyError here
    assert result.missing_keys == ['weight']


def test_legacy_v0_keys_load():
    manifest = load_manifest('vmamba', 'tiny', 'cls')
    renames = [('patch_embed.0.', 'patch_embed.proj.'), ('patch_embed.2.', 'patch_embed.norm.'),
               ('.op.', '.self_attention.'), ('classifier.norm.', 'norm.'), ('classifier.head.', 'head.')]
    legacy = {}
    for key, shape in manifest['state_dict']:
        for new, old in renames:
            key = key.replace(new, old)
        if '.blocks.' in key:
            key = key.replace('.norm.', '.ln_1.')  # v0 called the block's first norm ln_1
        legacy[key] = torch.empty(shape, device='meta')
    assert any('self_attention' in k for k in legacy) and 'norm.weight' in legacy
    with on_meta():  # loading a meta model checks every key and shape, and copies nothing
        classifier = build_classifier(BY_NAME['VMamba'], 'tiny')
    classifier.load_state_dict(convert_upstream_state_dict({'model': legacy}), strict=True)


def test_ssm_initialisation_follows_upstream():
    op = VMamba(dict(dims=16, depths=[1, 1, 1, 1], ssm_ratio=2.0)).layers[0].blocks[0].op
    assert op.x_proj_weight.shape == (4, op.dt_rank + 2, 32)
    assert torch.all(op.A_logs == 0) and torch.all(op.Ds == 1)
    dt = torch.nn.functional.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert op.x_proj_weight.abs().max() <= 32**-0.5
