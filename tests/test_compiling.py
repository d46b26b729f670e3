"""CompiledOrNone: compile failures fall back to eager per input signature; run-time errors propagate.

Backends here are dynamo's "eager" or small Python callables, so nothing waits on inductor."""
import warnings

import pytest
import torch
from torch._inductor.exc import InvalidCxxCompiler

from retinanet.compiling import CompiledOrNone


def failing_backend(fail_for_length: int | None, exc: type[Exception] = ValueError):
    """A backend that raises `exc` for graphs whose first input has length `fail_for_length`
    (None: for all); `calls` records the lengths it was asked to compile."""
    calls = []

    def backend(graph, example_inputs):
        length = example_inputs[0].shape[0]
        calls.append(length)
        if fail_for_length is None or length == fail_for_length:
            raise exc()
        return graph.forward
    return backend, calls


def _compile_warnings(caught) -> list:
    return [w for w in caught if "torch.compile failed" in str(w.message)]


@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("bad input"),
                                   torch.OutOfMemoryError("out of memory")])
def test_errors_raised_while_running_propagate_unchanged(error):
    def fn(x):
        y = x.sin()
        if x.shape[0] > 2:
            raise error
        return y
    compiled = CompiledOrNone(fn, "test.setting", backend="eager")
    torch.testing.assert_close(compiled(torch.ones(2)), torch.ones(2).sin(), rtol=0, atol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(type(error)) as raised:
            compiled(torch.ones(3))
    assert raised.value is error  # the very exception, not a wrapper
    assert not _compile_warnings(caught) and not compiled.failed


def test_a_compile_failure_returns_none_and_warns_once():
    backend, calls = failing_backend(None)
    compiled = CompiledOrNone(lambda x: x * 2, "test.setting", dynamic=False, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compiled(torch.ones(3)) is None
        assert compiled(torch.ones(3)) is None  # remembered: not compiled again
        assert compiled(torch.ones(4)) is None  # another signature: tried, and fails too
    assert calls == [3, 4]
    (warning,) = _compile_warnings(caught)
    assert "test.setting" in str(warning.message) and "ValueError" in str(warning.message)


def test_a_failure_for_one_signature_leaves_others_compiled():
    backend, calls = failing_backend(3)
    compiled = CompiledOrNone(lambda x: x * 2, "test.setting", dynamic=False, backend=backend)
    with pytest.warns(UserWarning, match="test.setting"):
        assert compiled(torch.ones(3)) is None
    torch.testing.assert_close(compiled(torch.ones(4)), torch.full((4,), 2.0), rtol=0, atol=0)
    assert compiled(torch.ones(3)) is None
    torch.testing.assert_close(compiled(torch.ones(4)), torch.full((4,), 2.0), rtol=0, atol=0)
    assert calls == [3, 4]  # shape 3 not retried, shape 4 compiled once


def test_signature_covers_dtype_and_plain_arguments_and_ranks_when_dynamic():
    compiled = CompiledOrNone(lambda x, s: x * s, "test.setting", backend="eager")
    x = torch.ones(3)
    assert compiled.signature((x, 2.0)) != compiled.signature((x.double(), 2.0))
    assert compiled.signature((x, 2.0)) != compiled.signature((x, 3.0))
    assert compiled.signature((x, 2.0)) != compiled.signature((torch.ones(4), 2.0))
    dynamic = CompiledOrNone(lambda x: x, "test.setting", dynamic=True, backend="eager")
    assert dynamic.signature((x,)) == dynamic.signature((torch.ones(4),))  # one graph for all sizes
    assert dynamic.signature((x,)) != dynamic.signature((torch.ones(3, 1),))


def test_a_missing_cpp_compiler_stops_all_compiles():
    backend, calls = failing_backend(None, InvalidCxxCompiler)
    compiled = CompiledOrNone(lambda x: x * 2, "test.setting", dynamic=False, backend=backend)
    with pytest.warns(UserWarning, match="test.setting"):
        assert compiled(torch.ones(3)) is None
    assert compiled(torch.ones(4)) is None
    assert calls == [3]  # no retry per shape when no shape can compile


def test_the_recompile_limit_made_an_error_falls_back():
    compiled = CompiledOrNone(lambda x: x * 2, "test.setting", dynamic=False, backend="eager",
                              dynamo_config={"recompile_limit": 1, "fail_on_recompile_limit_hit": True})
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 2.0), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="test.setting"):
        assert compiled(torch.ones(4)) is None
    torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 2.0), rtol=0, atol=0)
