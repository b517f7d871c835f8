"""Adam and SGD steps for image optimization (class images, dreams, extremal masks).

They compute exactly what `torch.optim.Adam` / `torch.optim.SGD` compute on CPU (their
single-tensor code path, bit for bit), without `torch.optim`'s first-use import of its
compiler (about 1 s of a scan's start-up on two cores).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class _Optimizer:
    """The parameters an optimizer steps, and their gradients' reset."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float):
        self.params = list(params)
        self.lr = lr

    def zero_grad(self) -> None:
        """Forget the gradients (set to None, as `torch.optim` does by default)."""
        for param in self.params:
            param.grad = None


class Adam(_Optimizer):
    """`torch.optim.Adam(params, lr, betas, eps)` (no weight decay, no AMSGrad)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(params, lr)
        self.betas, self.eps = betas, eps
        self._steps = [0] * len(self.params)  # per parameter: those without a gradient wait
        self._mean = [torch.zeros_like(p) for p in self.params]
        self._square = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter with a gradient."""
        beta1, beta2 = self.betas
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            mean, square = self._mean[i], self._square[i]
            self._steps[i] += 1
            step_size = self.lr / (1 - beta1 ** self._steps[i])
            correction2 = (1 - beta2 ** self._steps[i]) ** 0.5  # as torch has it, to the bit
            grad = param.grad
            mean.lerp_(grad, 1 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (square.sqrt() / correction2).add_(self.eps)
            param.addcdiv_(mean, denominator, value=-step_size)


class SGD(_Optimizer):
    """`torch.optim.SGD(params, lr, momentum, dampening)` (no weight decay, no Nesterov):
    the first step takes the gradient itself as the momentum buffer, as torch does."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
    ):
        super().__init__(params, lr)
        self.momentum, self.dampening = momentum, dampening
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        """One SGD update of every parameter with a gradient."""
        for i, param in enumerate(self.params):
            if param.grad is None:
                continue
            grad = param.grad
            if self.momentum != 0:
                buffer = self._buffers[i]
                if buffer is None:
                    buffer = self._buffers[i] = grad.clone().detach()
                else:
                    buffer.mul_(self.momentum).add_(grad, alpha=1 - self.dampening)
                grad = buffer
            param.add_(grad, alpha=-self.lr)
