"""Random invalid arguments for every public op: each call raises TypeError or ValueError
whose message names the argument that is wrong, and explain() on the same arguments raises
the same error (it validates like the op it explains). Never an accepted call, a crash
inside a kernel or an error blaming another argument.

One line per op in OPS: its name (llmkernels.<name>, and its explain() name) and a function
returning valid keyword arguments (small float32 tensors). The mutations are generic: they
are invalid for any op here, whatever its parameters.
"""

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import randn

pytest.importorskip("hypothesis")  # not on the GPU machine; CI requires it (conftest)

from hypothesis import given, settings
from hypothesis import strategies as st

import llmkernels


@dataclass(frozen=True)
class OpCase:
    name: str
    valid: Callable[[], dict]
    index_tensors: tuple = ()  # integer tensors (class indices): a floating dtype is what is invalid there


OPS = [
    OpCase("flash_attention", lambda: dict(q=randn(1, 2, 5, 8), k=randn(1, 2, 5, 8), v=randn(1, 2, 5, 8),
                                           causal=True, scale=0.3)),  # fmt: skip
    OpCase("layer_norm", lambda: dict(x=randn(3, 8), weight=randn(8), bias=randn(8), eps=1e-5)),
    OpCase("add_layer_norm", lambda: dict(x=randn(3, 8), residual=randn(3, 8), weight=randn(8), bias=randn(8),
                                          eps=1e-5)),  # fmt: skip
    OpCase("linear_cross_entropy", lambda: dict(x=randn(3, 8), weight=randn(5, 8), targets=torch.tensor([0, 4, 2]),
                                                bias=randn(5), ignore_index=-1, reduction="mean"),
           index_tensors=("targets",)),  # fmt: skip
    OpCase("gelu", lambda: dict(x=randn(3, 8), approximate="tanh")),
    OpCase("bias_gelu", lambda: dict(x=randn(3, 8), bias=randn(8))),
]

NOT_A_NUMBER = st.sampled_from([float("nan"), float("inf"), float("-inf"), "1e-5", True, [1.0], torch.ones(1)])
NOT_A_BOOL = st.one_of(st.text(max_size=5), st.integers(), st.floats(), st.none(), st.just(torch.tensor(True)))
NOT_A_TENSOR = st.one_of(st.floats(), st.text(max_size=5), st.lists(st.floats(), max_size=3))


def mutations(kwargs: dict, index_tensors: tuple = ()):
    """A strategy of (argument name, invalid value) over the op's arguments."""
    all_tensors = [name for name, value in kwargs.items() if isinstance(value, torch.Tensor)]
    choices = [st.tuples(st.sampled_from(all_tensors), NOT_A_TENSOR)]
    for name in index_tensors:
        choices.append(st.sampled_from([torch.float32, torch.int32, torch.bool]).map(
            lambda dtype, name=name: (name, kwargs[name].to(dtype))))
    tensors = [name for name in all_tensors if name not in index_tensors]
    others = tensors[1:]  # checked against the first tensor (q, x)
    choices.append(
        st.tuples(st.sampled_from(tensors), st.sampled_from([torch.int32, torch.int64, torch.bool])).map(
            lambda pair: (pair[0], kwargs[pair[0]].to(pair[1]))
        )
    )
    if others:
        choices.append(
            st.tuples(st.sampled_from(others), st.sampled_from([torch.float16, torch.bfloat16, torch.float64])).map(
                lambda pair: (pair[0], kwargs[pair[0]].to(pair[1]))
            )
        )
        choices.append(st.sampled_from(others).map(lambda name: (name, kwargs[name].to("meta"))))
        last_dim_change = st.tuples(st.sampled_from(tensors), st.integers(1, 5))
        choices.append(last_dim_change.map(lambda pair: (pair[0], resize_last_dim(kwargs[pair[0]], pair[1]))))
    for name, value in kwargs.items():
        if isinstance(value, bool):
            choices.append(st.tuples(st.just(name), NOT_A_BOOL))
        elif isinstance(value, float):
            choices.append(st.tuples(st.just(name), NOT_A_NUMBER))
        elif isinstance(value, int):
            choices.append(st.tuples(st.just(name), st.sampled_from([1.5, "1", None, True])))
        elif isinstance(value, str):
            choices.append(st.tuples(st.just(name), st.text(max_size=6).map(lambda text: "not-" + text)))
    choices.append(st.tuples(st.just("backend"), st.text(max_size=6).map(lambda text: "not-" + text)))
    return st.one_of(choices)


def resize_last_dim(tensor: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.randn(*tensor.shape[:-1], tensor.shape[-1] + extra)


@pytest.mark.parametrize("case", OPS, ids=lambda case: case.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_invalid_arguments_are_refused_naming_them(case, data):
    kwargs = case.valid()
    op = getattr(llmkernels, case.name)
    op(**kwargs)  # the starting point is valid
    name, bad = data.draw(mutations(kwargs, case.index_tensors), label="argument, value")
    kwargs[name] = bad
    with pytest.raises((TypeError, ValueError)) as refused:
        op(**kwargs)
    message = str(refused.value)
    assert re.search(rf"\b{name}\b", message), f"{name}={bad!r}: {message}"
    if name != "backend":  # explain() takes the op's arguments without a backend
        with pytest.raises(refused.type, match=re.escape(message)):
            llmkernels.explain(case.name, **kwargs)
