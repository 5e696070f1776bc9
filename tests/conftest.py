"""Shared fixtures: small inputs, seeded randomness, a tiny synthetic classification task."""

from __future__ import annotations

import os
import signal

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # A suite started as a background job (`pytest &`) inherits an ignored SIGINT, and so would every command it
    # runs: the Ctrl-C tests need it delivered as from a terminal (a handled signal is default again after exec).
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared
    2-core machine two threads per process oversubscribe the cores (spinning OpenMP workers made a training
    step ~20x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="Rewrite the reference files under tests/golden/ instead of comparing with them "
                          "(also: PEFTC_UPDATE_GOLDEN=1). Never done silently.")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when golden files should be regenerated (``pytest --update-golden`` or ``PEFTC_UPDATE_GOLDEN=1``)."""
    return bool(request.config.getoption("--update-golden") or os.environ.get("PEFTC_UPDATE_GOLDEN") == "1")


def synthetic_task(classes: int = 3, n: int = 24, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task: each class is a different mean colour plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    means = torch.randn(classes, 3, 1, 1, generator=gen)
    images = means[labels] + 0.3 * torch.randn(n, 3, size, size, generator=gen)
    return images, labels


def train_steps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int = 5,
                lr: float = 1e-2) -> list[float]:
    """A few Adam steps on the model's trainable parameters; returns the losses."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        streams = model.stream_examples(len(images)) if hasattr(model, "stream_examples") else {}
        loss = torch.nn.functional.cross_entropy(model(images, **streams), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
