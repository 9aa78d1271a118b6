"""Every linear path takes any number of rows, none included: 0 rows give an empty
(0, out_features) answer, and 1, 4 (the most the kernel widens in registers), 5 and many
rows give the float32 matmul of the weights the layer holds (on activations rounded to the
weights' format where the CPU's dot-product kernels run). A step with no row to sample projects zero
rows; a decode step one to four; a prefill many."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gptserve.model.cpu_kernels import FEW_ROWS
from gptserve.model.panel_linear import PanelLinear, panels_for_cpu
from gptserve.weights.loader import load_model
from tests.model.panel_reference import kernel_reference

ROWS = [0, 1, FEW_ROWS, FEW_ROWS + 1, 200]
IN, OUT = 72, 130  # not whole panels of 16 outputs: the last one is padded


def float32_reference(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ weight.double().T
    return (y if bias is None else y + bias.double()).float()


def layer_and_input(rows: int) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    layer = nn.Linear(IN, OUT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(OUT, IN, generator=g) * 0.1)
        layer.bias.copy_(torch.randn(OUT, generator=g))
    return layer, torch.randn(rows, IN, generator=g)


def assert_projects(got: torch.Tensor, want: torch.Tensor, rows: int) -> None:
    assert got.shape == (rows, OUT) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ROWS)
def test_plain_torch_linear(rows):
    layer, x = layer_and_input(rows)
    with torch.inference_mode():
        assert_projects(layer(x), float32_reference(layer.weight, layer.bias, x), rows)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("path", ["kernel", "no-kernel"])
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "float16", "int8"])
def test_panel_linear(fmt, path, rows, monkeypatch):
    if path != "kernel":
        monkeypatch.setattr("gptserve.model.panel_linear.panel_kernels", lambda: None)
    layer, x = layer_and_input(rows)
    panel = PanelLinear(layer.weight, layer.bias, fmt)
    assert (panel._kernels is not None) == (path == "kernel")
    with torch.inference_mode():
        assert_projects(panel(x), kernel_reference(panel, x), rows)


@pytest.mark.parametrize("precision", ["plain", "float32", "bfloat16", "float16", "int8"])
def test_the_lm_head_of_every_precision_projects_zero_rows_and_a_few(tiny_checkpoint, precision):
    model = load_model(tiny_checkpoint)
    if precision != "plain":
        assert panels_for_cpu(model, precision)
    vocab, width = model.config.vocab_size, model.config.n_embd
    hidden = torch.randn(FEW_ROWS + 1, width, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert model.logits(hidden[:0]).shape == (0, vocab)
        many = model.logits(hidden)
        for rows in (1, FEW_ROWS):  # the few-rows path gives what the many-rows path gives
            torch.testing.assert_close(model.logits(hidden[:rows]), many[:rows], rtol=1e-5, atol=1e-5)
