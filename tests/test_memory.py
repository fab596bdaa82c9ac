import torch
from torch import nn

from locallearn.bench import random_data, trainer_for
from locallearn.measure import SavedTensorMeter, step_peak_bytes


def test_meter_counts_saved_activations_once_and_releases_them():
    net = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 10))
    x = torch.randn(32, 100)
    with SavedTensorMeter(net) as meter:
        loss = net(x).sum()
        # Linear 1 saves x; ReLU saves its output, which Linear 2 saves again (counted once).
        assert meter.current == 32 * 100 * 4 + 32 * 200 * 4
        loss.backward()
        del loss
    assert meter.current == 0 and meter.peak == 32 * 300 * 4


def test_per_part_backward_cuts_activation_memory():
    # Tiny stand-in for benchmarks/memory.py: K = 4 parts should hold well under half.
    data = random_data(8, 16)
    peaks = {}
    for rule, blocks in (("e2e", None), ("layerwise", 4)):
        torch.manual_seed(0)
        trainer = trainer_for(rule, "resnet18_cifar", data, 8, blocks)
        peaks[rule] = step_peak_bytes(trainer, data.train_images, data.train_labels)
    assert peaks["e2e"] > 0
    assert peaks["layerwise"] / peaks["e2e"] < 0.5
