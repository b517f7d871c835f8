"""The light optimizers step exactly as torch.optim's Adam and SGD do on CPU."""

import pytest
import torch

from cnnscan.optimizers import SGD, Adam


def _run(make, steps=7):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 5, generator=generator).requires_grad_(True) for _ in range(2)]
    optimizer = make(params)
    for step in range(steps):
        optimizer.zero_grad()
        loss = sum(((p - step) ** 2).sum() * (i + 1) for i, p in enumerate(params))
        if step != 3:  # one step where the second parameter has no gradient
            loss.backward()
        else:
            (params[0] ** 2).sum().backward()
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda p: Adam(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
        (
            lambda p: Adam(p, lr=0.1, betas=(0.5, 0.9), eps=1e-4),
            lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.5, 0.9), eps=1e-4),
        ),
        (lambda p: SGD(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.01)),
        (
            lambda p: SGD(p, lr=0.2, momentum=0.9, dampening=0.9),
            lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, dampening=0.9),
        ),
    ],
    ids=["adam", "adam-betas", "sgd", "sgd-momentum"],
)
def test_steps_equal_torch_optim_bit_for_bit(ours, theirs):
    for mine, reference in zip(_run(ours), _run(theirs), strict=True):
        assert torch.equal(mine, reference)


def test_zero_grad_sets_gradients_to_none():
    param = torch.ones(2, requires_grad=True)
    optimizer = Adam([param])
    param.sum().backward()
    optimizer.zero_grad()
    assert param.grad is None
