"""Tiny hand-built networks shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RELU_FORMS = ("module", "module_inplace", "functional", "torch", "method", "method_inplace")
RELU6_FORMS = ("relu6_module", "relu6_functional", "hardtanh")


def apply_relu(form: str, x: torch.Tensor, modules: nn.ModuleDict) -> torch.Tensor:
    if form == "module":
        return modules["relu"](x)
    if form == "module_inplace":
        return modules["relu_inplace"](x)
    if form == "functional":
        return F.relu(x)
    if form == "torch":
        return torch.relu(x)
    if form == "method":
        return x.relu()
    if form == "method_inplace":
        return x.relu_()
    if form == "relu6_module":
        return modules["relu6"](x)
    if form == "relu6_functional":
        return F.relu6(x)
    if form == "hardtanh":
        return F.hardtanh(x, 0.0, 6.0)
    raise ValueError(form)


class SmallConvNet(nn.Module):
    """conv -> relu -> maxpool -> conv -> relu (called twice: one module, two calls) -> fc."""

    def __init__(self, relu_form: str = "module", classes: int = 5, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.relu_form = relu_form
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.acts = nn.ModuleDict(
            {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "relu6": nn.ReLU6()}
        )
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(apply_relu(self.relu_form, self.conv1(x), self.acts))
        x = apply_relu(self.relu_form, self.conv2(x), self.acts)
        x = apply_relu(self.relu_form, self.conv3(x), self.acts)
        return self.fc(x.mean(dim=(2, 3)))


class Linear(nn.Module):
    """f(x) = W · flatten(x) + b: every gradient method has a closed form."""

    def __init__(self, shape=(3, 8, 8), classes: int = 4, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(int(torch.tensor(shape).prod()), classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=generator))
            self.fc.bias.copy_(torch.randn(classes, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class SquareSum(nn.Module):
    """f_k(x) = (k + 1) · Σ x²: gradient 2(k + 1)x, so SmoothGrad/VarGrad have closed forms."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.scale = nn.Parameter(torch.arange(1.0, classes + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * x).flatten(1).sum(dim=1, keepdim=True) * self.scale


class SmoothConvNet(nn.Module):
    """conv -> softplus -> conv -> softplus -> mean -> fc: smooth, so quadrature converges fast."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.softplus(self.conv2(F.softplus(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class CaptumVisibleReLU6(nn.ReLU):
    """ReLU6 that captum's GuidedBackprop/Deconvolution hook (they only hook nn.ReLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x, 0.0, 6.0)


def relu6_visible_to_captum(model: nn.Module) -> nn.Module:
    """A deep copy whose nn.ReLU6 modules are CaptumVisibleReLU6 (a module used twice stays
    one module used twice); the forward is unchanged."""
    import copy

    model = copy.deepcopy(model)
    replacement: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                new = replacement.setdefault(id(child), CaptumVisibleReLU6())
                setattr(parent, name, new)
    return model
