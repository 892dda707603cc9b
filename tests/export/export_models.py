"""Models for the export tests: LeNet-300-100, LeNet-5-Caffe, a ResNet block, BatchNorm convs, a functional net."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import npn_kernels as npn

FAMILIES = {"binary": npn.Binary(), "hc": npn.HardConcrete()}


def lenet300(gate, granularity="in", **kw):
    return nn.Sequential(
        npn.GatedLinear(784, 300, gate=gate, granularity=granularity, **kw), nn.ReLU(),
        npn.GatedLinear(300, 100, gate=gate, granularity=granularity, **kw), nn.ReLU(),
        npn.GatedLinear(100, 10, gate=gate, granularity=granularity, **kw),
    )  # fmt: skip


def lenet5(gate, conv="out", linear="in", **kw):
    return nn.Sequential(
        npn.GatedConv2d(1, 20, 5, gate=gate, granularity=conv, **kw), nn.ReLU(), nn.MaxPool2d(2),
        npn.GatedConv2d(20, 50, 5, gate=gate, granularity=conv, **kw), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        npn.GatedLinear(800, 500, gate=gate, granularity=linear, **kw), nn.ReLU(),
        npn.GatedLinear(500, 10, gate=gate, granularity=linear, **kw),
    )  # fmt: skip


class ResNetBlockNet(nn.Module):
    """stem conv -> [conv-bn-relu-conv-bn + identity] -> relu -> conv ("in" gates) -> pool -> linear."""

    def __init__(self, gate, c=8):
        super().__init__()
        self.stem = npn.GatedConv2d(3, c, 3, padding=1, gate=gate, granularity="out")
        self.conv1 = npn.GatedConv2d(c, c, 3, padding=1, bias=False, gate=gate, granularity="out")
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = npn.GatedConv2d(c, c, 3, padding=1, bias=False, gate=gate, granularity="out")
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = npn.GatedConv2d(c, 6, 3, gate=gate, granularity="in")
        self.fc = npn.GatedLinear(6, 4, gate=gate, granularity="in")

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(x + y)
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 1)
        return self.fc(torch.flatten(x, 1))


def bn_convs(gate):
    return nn.Sequential(
        npn.GatedConv2d(3, 8, 3, gate=gate, granularity="out"), nn.BatchNorm2d(8), nn.ReLU(),
        npn.GatedConv2d(8, 6, 3, gate=gate, granularity="in"), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        npn.GatedLinear(6, 5, gate=gate, granularity="in"), nn.Sigmoid(),
        npn.GatedLinear(5, 3, gate=gate, granularity="in"),
    )  # fmt: skip


class Functional(nn.Module):
    """forward written with functional calls; the Linears see a view(x.size(0), -1)."""

    def __init__(self, gate):
        super().__init__()
        self.conv = npn.GatedConv2d(1, 6, 3, gate=gate, granularity="out")
        self.fc1 = npn.GatedLinear(6 * 3 * 3, 12, gate=gate, granularity="out")
        self.fc2 = npn.GatedLinear(12, 4, gate=gate, granularity="in")

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        x = x.view(x.size(0), -1)
        x = F.dropout(F.relu(self.fc1(x)), 0.5, self.training)
        return torch.tanh(self.fc2(x))


class Untraceable(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.fc = npn.GatedLinear(4, 3, gate=gate)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


INPUTS = {"lenet300": (784,), "lenet5": (1, 28, 28), "resnet": (3, 8, 8), "bn_convs": (3, 10, 10),
          "functional": (1, 8, 8)}  # fmt: skip
BUILDERS = {"lenet300": lenet300, "lenet5": lenet5, "resnet": ResNetBlockNet, "bn_convs": bn_convs,
            "functional": Functional}  # fmt: skip


@torch.no_grad()
def random_gates(model, magnitude=5.0, p_open=0.5):
    """phi = ±magnitude at random (open with probability p_open); BatchNorm statistics made non-trivial."""
    for m in model.modules():
        if isinstance(m, npn.nn.GatedModule):
            m.phi.copy_(torch.where(torch.rand_like(m.phi) < p_open, magnitude, -magnitude))
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return model


def build(name, gate, dtype=torch.float64):
    return random_gates(BUILDERS[name](gate)).to(dtype).eval()
