"""Model-shaped workloads: one optimizer step over all of a real model's parameter tensors.

Real models are many tensors of very different sizes, and that is where per-array overheads
(checks, a kernel launch or a thread-team start per array) show. The shapes here are those of
published models, so the benchmark steps what users step:

- ``mlp``: a small multilayer perceptron, 784-128-256-64-10 (8 tensors, 150,602 parameters);
- ``gpt2-tiny``: GPT-2's structure, scaled down (28 tensors, 172K parameters);
- ``resnet50``: torchvision's ResNet-50 (161 tensors, 25.6M parameters, many tiny
  BatchNorm vectors beside large convolutions);
- ``gpt2``: GPT-2 small (148 tensors, 124.4M parameters).

:data:`MODEL_VARIANTS` are the implementations compared on them (fastrms's grouped step, its
per-array functional calls, ``torch.optim`` fused and foreach); :func:`model_ceiling` gives the
two bounds: the algorithm's read/write pattern run per tensor, and over one flat array of the
same total size. Every variant's first step is checked against the NumPy reference.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ... import functional
from . import cases, ceilings
from .variants import TORCH_STATE, Runner, check, cpu_why_not, fastmath, import_torch, torch_why_not

Shapes = dict[str, tuple[int, ...]]
Tensors = dict[str, cases.Arrays]


def mlp_shapes(sizes: tuple[int, ...] = (784, 128, 256, 64, 10)) -> Shapes:
    """A multilayer perceptron's weights ``(out, in)`` and biases (torch.nn.Linear's layout).

    The default is 8 tensors and 150,602 parameters, the size of the MLP the issue measured.
    """
    shapes: Shapes = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        shapes[f"fc{i}.weight"] = (n_out, n_in)
        shapes[f"fc{i}.bias"] = (n_out,)
    return shapes


def resnet50_shapes(num_classes: int = 1000) -> Shapes:
    """The parameter shapes of ResNet-50 (He et al. 2016; torchvision's ``resnet50``).

    161 tensors, 25,557,032 parameters: the stem convolution and BatchNorm, 16 bottleneck
    blocks (1x1, 3x3, 1x1 convolutions without bias, each followed by a BatchNorm with a weight
    and a bias; the first block of each stage also projects its input), and the classifier.
    """
    shapes: Shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            convs = {
                "conv1": (planes, inplanes, 1, 1),
                "conv2": (planes, planes, 3, 3),
                "conv3": (planes * 4, planes, 1, 1),
            }
            for i, (name, shape) in enumerate(convs.items(), start=1):
                shapes[pre + f"{name}.weight"] = shape
                shapes[pre + f"bn{i}.weight"] = shapes[pre + f"bn{i}.bias"] = (shape[0],)
            if b == 0:
                shapes[pre + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                shapes[pre + "downsample.1.weight"] = (planes * 4,)
                shapes[pre + "downsample.1.bias"] = (planes * 4,)
            inplanes = planes * 4
    shapes |= {"fc.weight": (num_classes, 2048), "fc.bias": (num_classes,)}
    return shapes


def gpt2_shapes(
    n_layer: int = 12, n_embd: int = 768, vocab: int = 50257, n_positions: int = 1024
) -> Shapes:
    """The parameter shapes of GPT-2 (defaults: GPT-2 small, 148 tensors, 124.4M parameters).

    From the published configuration (Radford et al. 2019; Hugging Face ``GPT2Config``):
    token and position embeddings, per layer two LayerNorms, the attention's fused QKV and
    output projections, and the MLP's two projections (Conv1D weights are ``(in, out)``), then
    the final LayerNorm. The output projection is tied to ``wte``, so it adds no tensor.
    """
    e = n_embd
    shapes: Shapes = {"wte": (vocab, e), "wpe": (n_positions, e)}
    for i in range(n_layer):
        h = f"h.{i}."
        shapes |= {
            h + "ln_1.weight": (e,), h + "ln_1.bias": (e,),
            h + "attn.c_attn.weight": (e, 3 * e), h + "attn.c_attn.bias": (3 * e,),
            h + "attn.c_proj.weight": (e, e), h + "attn.c_proj.bias": (e,),
            h + "ln_2.weight": (e,), h + "ln_2.bias": (e,),
            h + "mlp.c_fc.weight": (e, 4 * e), h + "mlp.c_fc.bias": (4 * e,),
            h + "mlp.c_proj.weight": (4 * e, e), h + "mlp.c_proj.bias": (e,),
        }  # fmt: skip
    shapes |= {"ln_f.weight": (e,), "ln_f.bias": (e,)}
    return shapes


#: The models, by name; each gives its parameter shapes.
MODELS: dict[str, Callable[[], Shapes]] = {
    "mlp": mlp_shapes,
    "gpt2-tiny": functools.partial(gpt2_shapes, n_layer=2, n_embd=64, vocab=1000, n_positions=128),
    "resnet50": resnet50_shapes,
    "gpt2": gpt2_shapes,
}
#: The small models of the default report; the large ones take a few GB of memory.
SMALL_MODELS = ("mlp", "gpt2-tiny")
#: The algorithms stepped over the models (keys of :data:`fastrms.tools.bench.cases.ALGOS`).
MODEL_ALGOS = ("adam", "rmsprop", "adagrad")


def model_arrays(shapes: Shapes, seed: int = 0) -> Tensors:
    """Per tensor, a standard-normal ``param`` and ``grad`` of its shape."""
    rng = np.random.default_rng(seed)
    return {
        name: {
            "param": rng.standard_normal(shape, dtype=cases.DTYPE),
            "grad": rng.standard_normal(shape, dtype=cases.DTYPE),
        }
        for name, shape in shapes.items()
    }


def fresh_copies(tensors: Tensors) -> Tensors:
    """Copies of the parameters (the gradients are only read, so they are shared)."""
    return {k: {"param": t["param"].copy(), "grad": t["grad"]} for k, t in tensors.items()}


def _functional_step(algo: cases.Algo, param, grad, state: dict, backend: str) -> None:
    step = {} if algo.rule == "rmsprop" else {"step": 1}
    getattr(functional, algo.rule)(param, grad, **state, **step, **algo.options, backend=backend)


def model_reference(algo: cases.Algo, tensors: Tensors) -> Tensors:
    """Each tensor after one step of ``algo`` from zero state, by the NumPy reference."""
    out = {}
    for name, t in tensors.items():
        state = {s: np.zeros_like(t["param"]) for s in algo.state}
        param = t["param"].copy()
        _functional_step(algo, param, t["grad"], state, "numpy")
        out[name] = {"param": param, **state}
    return out


def _fastrms_grouped(algo: cases.Algo, tensors: Tensors, threads: int) -> Runner:
    from ...optim import OPTIMIZERS

    names = list(tensors)
    params = [tensors[k]["param"] for k in names]
    grads = [tensors[k]["grad"] for k in names]
    opt = OPTIMIZERS[algo.rule](params, backend="cpu", **algo.options)

    def result() -> Tensors:
        return {
            k: {"param": params[i], **{s: opt.state[s][i] for s in algo.state}}
            for i, k in enumerate(names)
        }

    return Runner(functools.partial(opt.step, grads), result, keep=opt)


def _fastrms_per_array(algo: cases.Algo, tensors: Tensors, threads: int) -> Runner:
    from ...dispatch import get

    zeros = get("cpu").zeros_like
    state = {
        k: {s: zeros(t["param"], j + 1) for j, s in enumerate(algo.state)}
        for k, t in tensors.items()
    }

    def step() -> None:
        for k, t in tensors.items():
            _functional_step(algo, t["param"], t["grad"], state[k], "cpu")

    def result() -> Tensors:
        return {k: {"param": t["param"], **state[k]} for k, t in tensors.items()}

    return Runner(step, result, keep=state)


def _torch(mode: str):
    def build(algo: cases.Algo, tensors: Tensors, threads: int) -> Runner:
        torch = import_torch()
        params = {}
        for k, t in tensors.items():
            p = params[k] = torch.from_numpy(t["param"])
            p.grad = torch.from_numpy(t["grad"])
        cls = getattr(torch.optim, algo.torch_class)
        opt = cls(list(params.values()), **algo.options, **{mode: True})
        names = {s: TORCH_STATE.get(s, s) for s in algo.state}

        def result() -> Tensors:
            return {
                k: {"param": p.numpy(), **{s: opt.state[p][n].numpy() for s, n in names.items()}}
                for k, p in params.items()
            }

        return Runner(opt.step, result, keep=(opt, params))

    return build


@dataclass(frozen=True)
class ModelVariant:
    name: str
    label: str
    build: Callable[[cases.Algo, Tensors, int], Runner]
    why_not: Callable[[cases.Algo], str | None] = lambda algo: None
    exact: bool = False


MODEL_VARIANTS: dict[str, ModelVariant] = {
    v.name: v
    for v in (
        ModelVariant("cpu", "fastrms (grouped step)", _fastrms_grouped, cpu_why_not, True),
        ModelVariant(
            "cpu-per-array",
            "fastrms, one call per array",
            _fastrms_per_array,
            cpu_why_not,
            True,
        ),  # fmt: skip
        ModelVariant("torch-fused", "torch fused", _torch("fused"), torch_why_not("fused")),
        ModelVariant("torch-foreach", "torch foreach", _torch("foreach"), torch_why_not("foreach")),
    )
}
#: The two bounds, run with the algorithm's read/write pattern, each named for what it bounds:
#: one loop per tensor (the per-array step), and one loop over one flat array of the model's
#: size (any step over all the tensors at once, as the grouped step is).
CEILINGS = {
    "ceiling": "per-tensor ceiling (bounds one call per tensor)",
    "ceiling-flat": "flat ceiling (bounds one pass over all tensors)",
}


def model_ceiling(algo: cases.Algo, tensors: Tensors, flat: bool = False) -> Runner:
    """``algo``'s read/write pattern per tensor, or (``flat``) over one array of their total
    size: the bounds for a per-tensor and for a grouped step."""
    if flat:
        n = sum(t["param"].size for t in tensors.values())
        arrays = cases.make_arrays(algo, n)
        return ceilings.ceiling(algo, arrays)
    runners = [
        ceilings.ceiling(algo, {**t, **{s: np.zeros_like(t["param"]) for s in algo.state}}).step
        for t in tensors.values()
    ]

    def step() -> None:
        for r in runners:
            r()

    return Runner(step, lambda: {}, keep=runners)


def model_check(variant: ModelVariant, result: Tensors, expected: Tensors) -> str | None:
    """As :func:`fastrms.tools.bench.variants.check`, tensor by tensor; names the first that
    differs."""
    return check_tensors(result, expected, variant.exact and not fastmath())


def check_tensors(result: Tensors, expected: Tensors, exact: bool) -> str | None:
    """:func:`fastrms.tools.bench.variants.check` of each tensor's arrays (bit for bit if
    ``exact``); None when all agree, else where the first tensor differs."""
    for name, want in expected.items():
        flat = {k: a.reshape(-1) for k, a in want.items()}
        got = {k: a.reshape(-1) for k, a in result[name].items()}
        problem = check(got, flat, exact)
        if problem:
            return f"tensor {name}: {problem}"
    return None


def model_size(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def overhead_runners(algo: cases.Algo, tensors: Tensors) -> tuple[Runner, Runner]:
    """``(step, kernels)``: a grouped fastrms step over ``tensors`` with the same gradients
    each time (the cached path), and the bare kernel calls of that step. Their difference is
    the Python-side cost of a step."""
    step = _fastrms_grouped(algo, tensors, 0)
    step.step()
    opt = step.keep
    setup = opt._setup(opt.step_count + 1, opt._hyper())
    calls = opt._plan.kernel_calls(setup)

    def kernels() -> None:
        for call in calls:
            call()

    return step, Runner(kernels, lambda: {}, keep=calls)


#: Tensor counts of the Python-side cost measurement (4-element tensors: no kernel time).
OVERHEAD_COUNTS = (1, 10, 100, 1000)


def tiny_tensors(count: int) -> Tensors:
    """``count`` tensors of 4 elements: a step of them is all overhead."""
    return model_arrays({f"t{i}": (4,) for i in range(count)})
