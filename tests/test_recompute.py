"""recomputed: plain gradients, batch-norm statistics moved once, one head alive at a time."""

import copy

import torch
from torch import nn

from locallearn.measure import SavedTensorMeter
from locallearn.recompute import recomputed


def _head(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 4, 3, padding=1))


def _loss(head, target):
    return lambda z: (head(z) - target).pow(2).mean()


def test_gradients_and_statistics_equal_the_plain_computation():
    plain, wrapped = _head(0), _head(0)
    h0 = torch.randn(6, 8, 5, 5)
    target = torch.randn(6, 4, 5, 5)
    grads = []
    for head, wrap in ((plain, False), (wrapped, True)):
        h = h0.clone().requires_grad_()
        fn = _loss(head, target)
        value = recomputed(fn, head, h) if wrap else fn(h)
        (3 * value).backward()
        grads.append([h.grad, *(p.grad for p in head.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.state_dict().values(), wrapped.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # running statistics moved once, not twice
    assert int(wrapped[1].num_batches_tracked) == 1


def test_heads_are_alive_one_at_a_time():
    blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    heads = [_head(1), _head(2)]
    x, target = torch.randn(4, 8, 16, 16), torch.randn(4, 4, 16, 16)
    peaks = {}
    for wrap in (False, True):
        models = [copy.deepcopy(m) for m in (blocks, *heads)]
        with SavedTensorMeter(*models) as meter:
            h = models[0](x)
            total = sum(recomputed(_loss(m, target), m, h) if wrap else _loss(m, target)(h)
                        for m in models[1:])
            total.backward()
        peaks[wrap] = meter.peak
    with SavedTensorMeter(blocks) as meter:
        h = blocks(x)
    alone = meter.peak
    with SavedTensorMeter(blocks, heads[0]) as meter:
        _loss(heads[0], target)(blocks(x))
    head = meter.peak - alone  # what one head saves beyond its input (shared with the blocks)
    assert head > alone  # the heads dominate, so the test tells the two peaks apart
    assert peaks[False] == alone + 2 * head  # both heads at once
    assert peaks[True] == alone + head  # one head, counted while it runs again in backward


def test_no_gradient_for_an_input_that_needs_none():
    head = _head(0)
    value = recomputed(_loss(head, torch.zeros(2, 4, 3, 3)), head, torch.randn(2, 8, 3, 3))
    value.backward()
    assert all(p.grad is not None for p in head.parameters())


def test_backward_reruns_under_the_forward_autocast():
    grads = []
    for wrap in (False, True):
        head = _head(0)
        h = torch.randn(4, 8, 6, 6, requires_grad=True)
        fn = _loss(head, torch.zeros(4, 4, 6, 6))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = recomputed(fn, head, h) if wrap else fn(h)
        value.float().backward()
        grads.append(head[0].weight.grad)
    # Recomputed in float32, the gradient would differ from the bfloat16 one by far more.
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
