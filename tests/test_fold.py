"""BatchNorm folding: the folded copy computes the model's function, the model is untouched,
and modules the user hooked keep their own call."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import cnnscan
from cnnscan.engine.folding import fold_layers


def _batchnorms_called(module: nn.Module) -> int:
    if not isinstance(module, torch.fx.GraphModule):
        return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    called = [n.target for n in module.graph.nodes if n.op == "call_module"]
    return sum(isinstance(module.get_submodule(target), nn.BatchNorm2d) for target in called)


def _with_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random-weight torchvision models have identity BatchNorm statistics: make them real."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
    return module.eval()


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenet_v3_small"])
def test_folded_copy_computes_the_same_logits(name):
    module = _with_statistics(getattr(torchvision.models, name)(weights=None)).double()
    before = copy.deepcopy(module.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = fold_layers(module)
    assert _batchnorms_called(result) == 0 < _batchnorms_called(module)
    with torch.no_grad():
        torch.testing.assert_close(result(x), module(x), rtol=1e-10, atol=1e-10)
    for key, value in module.state_dict().items():  # the source model is untouched
        assert torch.equal(value, before[key]), key


def test_default_model_folds_its_same_padding_convs(default_model):
    module = copy.deepcopy(default_model.module).double().eval()
    x = default_model.preprocess("sample:chelsea").double()
    result = fold_layers(module)
    assert _batchnorms_called(result) == 0
    pads = [
        n
        for n in result.graph.nodes
        if n.op == "call_module" and isinstance(result.get_submodule(n.target), nn.ZeroPad2d)
    ]
    before = sum(isinstance(m, nn.ZeroPad2d) for m in module.modules())
    assert len(pads) == 5 < before  # only the asymmetric 'same' pads of strided convs stay
    with torch.no_grad():
        torch.testing.assert_close(result(x), module(x), rtol=1e-10, atol=1e-10)


def test_hooked_modules_are_not_folded():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    net = nn.Sequential(*net, nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 8, 8))
    _with_statistics(net)
    seen = []
    net[1].register_forward_hook(lambda _m, _i, out: seen.append(out.sum()))
    result = fold_layers(net)
    assert _batchnorms_called(result) == 1  # the hooked one stays, the other folds
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result(x), net(x), rtol=1e-5, atol=1e-6)
    assert len(seen) == 2


def test_shared_or_branching_convs_are_not_folded():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y) + y  # the conv's output is used twice: folding would be wrong
            return self.fc(z.mean(dim=(2, 3)))

    net = _with_statistics(Branching())
    assert fold_layers(net) is net
    x = torch.randn(2, 3, 8, 8)
    scan = cnnscan.Scan(net, x)
    torch.testing.assert_close(scan.logits_at(x), net(x).detach(), rtol=1e-5, atol=1e-6)


def test_scan_logits_at_equals_the_models_forward():
    module = _with_statistics(torchvision.models.resnet18(weights=None))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    scan = cnnscan.Scan(module, x[:1])
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(scan.logits_at(x), expected, rtol=1e-4, atol=1e-4)


def test_kept_layers_stay_whole_and_their_hooks_see_every_call():
    """Synthesis folds around the layers its objective hooks: a kept block is one call at
    its own name (hooks on it fire as before), a kept BatchNorm is not folded away."""
    module = _with_statistics(torchvision.models.resnet18(weights=None)).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    keep = ["layer2.0", "layer3.1.bn2"]
    result = cnnscan.engine.folding.folded(module, keep)
    assert result is cnnscan.engine.folding.folded(module, keep)  # cached per set of kept names
    called = [n.target for n in result.graph.nodes if n.op == "call_module"]
    assert "layer2.0" in called and "layer2.0.conv1" not in called  # whole, not traced into
    assert "layer3.1.bn2" in called and "layer3.1.bn1" not in called  # kept vs folded

    def record(net: nn.Module) -> tuple[torch.Tensor, list]:
        seen: list = []
        handles = [
            net.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: seen.append((name, o.detach().clone()))
            )
            for name in keep
        ]
        with torch.no_grad():
            out = net(x)
        for handle in handles:
            handle.remove()
        return out, seen

    (ours, seen), (reference, expected) = record(result), record(module)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert [name for name, _ in seen] == [name for name, _ in expected] == keep
    for (_, output), (_, wanted) in zip(seen, expected, strict=True):
        torch.testing.assert_close(output, wanted, rtol=1e-10, atol=1e-10)


def test_a_borrowed_model_is_not_folded():
    module = _with_statistics(torchvision.models.resnet18(weights=None))
    assert cnnscan.engine.folding.folded_working_copy(module, module) is module
    copy_of = copy.deepcopy(module)
    assert cnnscan.engine.folding.folded_working_copy(copy_of, module) is not copy_of
