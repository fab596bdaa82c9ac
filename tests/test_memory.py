import importlib.util
from types import SimpleNamespace

import torch
from conftest import ROOT
from torch import nn

from locallearn import bench
from locallearn.bench import random_data, state_bytes, step_memory, trainer_for
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


def test_state_bytes_counts_weights_buffers_and_optimizer_state_once():
    data = random_data(8, 16)
    torch.manual_seed(0)
    trainer = trainer_for("e2e", "resnet18_cifar", data, 8, None)  # SGD with momentum
    weights = sum(p.nbytes for p in trainer.stack.parameters())
    buffers = sum(b.nbytes for b in trainer.stack.buffers())
    assert state_bytes(trainer) == weights + buffers  # no momentum before the first step
    saved, cuda = step_memory(trainer, data.train_images, data.train_labels)
    assert cuda is None and saved == step_peak_bytes(trainer, data.train_images,
                                                     data.train_labels)
    assert state_bytes(trainer) == 2 * weights + buffers  # one momentum buffer per weight


def test_step_memory_on_cuda_counts_the_second_step_from_what_was_allocated(monkeypatch):
    memory = {"now": 1000, "peak": 0}
    extra = [600, 300]  # the warm-up step allocates more (optimizer state, workspaces)

    def one_step(trainer, images, labels, trained):
        memory["peak"] = max(memory["peak"], memory["now"] + extra.pop(0))
        return 7

    monkeypatch.setattr(bench, "step_peak_bytes", one_step)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: memory["now"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device: memory.update(peak=memory["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: memory["peak"])
    trainer = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cuda")))
    assert bench.step_memory(trainer, None, None) == (7, 300) and not extra


def test_memory_script_prints_cuda_ratios_next_to_the_meters():
    spec = importlib.util.spec_from_file_location("memory", ROOT / "benchmarks" / "memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    mib = 2 ** 20
    rows = {"e2e": {"parts": 1, "phases": 1, "saved": 100 * mib, "state": 50 * mib,
                    "step": 200 * mib, "total": 250 * mib},
            "layerwise": {"parts": 5, "phases": 1, "saved": 34 * mib, "state": 51 * mib,
                          "step": 106 * mib, "total": 157 * mib}}
    head, e2e, local = memory.table(rows, cuda=True)
    assert head.split() == ["rule", "parts", "phases", "saved", "x", "e2e", "state", "cuda",
                            "step", "x", "e2e", "cuda", "total", "x", "e2e"]
    assert local.split() == ["layerwise", "5", "1", "34.0", "0.340", "51.0", "106.0", "0.530",
                             "157.0", "0.628"]
    assert e2e.split()[-1] == "1.000" and len(memory.table(rows, cuda=False)[1].split()) == 6
