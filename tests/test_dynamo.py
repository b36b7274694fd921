"""torch.compile(model, backend="slimc"): results against eager torch, graph breaks, dynamic
shapes, unsupported ops, weights changed after compiling, options."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from zoo import ZOO, _ids

import slimc.dynamo
from slimc.dynamo import SlimcFallbackWarning
from slimc.errors import OptionError

TOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test compiles from scratch: no cached frames from an earlier test's model
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _max_dev(a, b) -> float:
    return float((a - b).abs().max())


def test_bert_by_name_matches_eager():
    model, inputs, _ = ZOO["bert"]()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SlimcFallbackWarning)  # every subgraph ran on TVM
        want = model(*inputs)
        got = torch.compile(model, backend="slimc")(*inputs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _max_dev(got, want) <= TOL


def test_mha_with_fuse_runs_the_passes_and_matches():
    model, inputs, _ = ZOO["mha"]()
    b = slimc.dynamo.backend(passes=["fuse", "cleanup"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SlimcFallbackWarning)
        want = model(*inputs)
        got = torch.compile(model, backend=b)(*inputs)
    assert len(b.subgraphs) == 1
    assert b.subgraphs[0].passes == ["capture", "fuse", "cleanup"]
    assert _max_dev(got, want) <= TOL


def test_options_reach_the_backend():
    model, inputs, _ = ZOO["mha"]()
    with torch.no_grad():
        want = model(*inputs)
        got = torch.compile(model, backend="slimc", options={"passes": []})(*inputs)
    assert _max_dev(got, want) <= TOL
    with pytest.raises(Exception, match="unknown option.*'bogus'.*Valid options"), \
            torch.no_grad():
        torch.compile(model, backend="slimc", options={"bogus": 1})(*inputs)


class _Broken(torch.nn.Module):
    """Two linear layers with a graph break between them; ``special`` puts an op TVM cannot
    convert (i0) into the second subgraph."""

    def __init__(self, special: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)
        self.special = special

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        h = self.b(h)
        return torch.special.i0(h) if self.special else torch.tanh(h)


def test_graph_break_compiles_each_subgraph():
    model = _Broken().eval()
    x = torch.randn(4, 16)
    b = slimc.dynamo.backend()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SlimcFallbackWarning)
        got = torch.compile(model, backend=b)(x)
        want = model(x)
    assert len(b.subgraphs) == 2
    assert all(s.eager_reason is None and len(s.shapes) == 1 for s in b.subgraphs)
    assert _max_dev(got, want) <= TOL


def test_unsupported_op_runs_that_subgraph_eagerly_with_one_warning():
    model = _Broken(special=True).eval()
    x = torch.randn(4, 16)
    b = slimc.dynamo.backend()
    compiled = torch.compile(model, backend=b)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compiled(x)
        again = compiled(x)
        want = model(x)
    fallbacks = [w for w in caught if issubclass(w.category, SlimcFallbackWarning)]
    assert len(fallbacks) == 1 and "i0" in str(fallbacks[0].message)
    first, second = b.subgraphs
    assert first.eager_reason is None and len(first.shapes) == 1  # still on TVM
    assert "i0" in second.eager_reason
    assert _max_dev(got, want) <= TOL and _max_dev(again, want) <= TOL


def test_in_place_write_falls_back():
    class Inplace(torch.nn.Module):
        def forward(self, x, y):
            y.add_(1.0)  # the caller sees y change: TVM cannot write into y
            return x * 2

    x, y = torch.ones(3), torch.zeros(3)
    with pytest.warns(SlimcFallbackWarning, match=r"in place \(Tensor.add_ on input l_y_\)"):
        got = torch.compile(Inplace(), backend="slimc")(x, y)
    assert torch.equal(got, x * 2) and torch.equal(y, torch.ones(3))


def test_in_place_write_into_an_intermediate_still_compiles():
    class Intermediate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.act = torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.lin(x)
            h.mul_(2.0)  # h is the subgraph's own tensor: export makes this functional
            return self.act(h) + 1

    model, x = Intermediate().eval(), torch.randn(2, 4)
    b = slimc.dynamo.backend()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SlimcFallbackWarning)
        got = torch.compile(model, backend=b)(x)
        want = model(x)
    assert b.subgraphs[0].eager_reason is None and len(b.subgraphs[0].shapes) == 1
    assert _max_dev(got, want) <= TOL


def test_dynamic_shapes_compile_per_shape_up_to_max_shapes():
    model, _, _ = ZOO["mha"]()
    b = slimc.dynamo.backend(max_shapes=2)
    compiled = torch.compile(model, backend=b)
    lengths = (8, 5, 6, 7, 5, 7)
    xs = [torch.randn(1, s, 64, generator=torch.Generator().manual_seed(s)) for s in lengths]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [compiled(x) for x in xs]
        wants = [model(x) for x in xs]
    for got, want in zip(outs, wants):
        assert _max_dev(got, want) <= TOL
    static, dynamic = b.subgraphs  # dynamo recompiles with a symbolic length at the 2nd shape
    assert len(static.shapes) == 1 and static.eager_reason is None
    # 5 and 6 compiled (5 again reuses its build); 7 is past max_shapes: eager, one warning
    shapes = [e[0] for key in dynamic.shapes for e in key if isinstance(e[0], tuple)]
    assert shapes == [(1, 5, 64), (1, 6, 64)]
    assert dynamic.eager_reason is None
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, SlimcFallbackWarning)]
    assert len(fallbacks) == 1 and "max_shapes=2" in fallbacks[0]


@pytest.mark.slow  # three BERT builds; the mha test above covers the mechanism
def test_dynamic_bert_matches_eager_at_each_length():
    model, _, _ = ZOO["bert"]()
    b = slimc.dynamo.backend()
    compiled = torch.compile(model, backend=b)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SlimcFallbackWarning)
        for seq in (8, 12, 16):
            x = _ids(seq=seq)
            assert _max_dev(compiled(x), model(x)) <= TOL
    assert [len(s.shapes) for s in b.subgraphs] == [1, 2]


def test_weights_changed_after_compiling_fall_back_to_eager():
    model, inputs, _ = ZOO["mha"]()
    compiled = torch.compile(model, backend="slimc")
    with torch.no_grad():
        before = compiled(*inputs)
        assert _max_dev(before, model(*inputs)) <= TOL
        next(model.parameters()).mul_(0.5)  # in place: the compiled library is stale now
        with pytest.warns(SlimcFallbackWarning, match="changed in place"):
            after = compiled(*inputs)
        assert _max_dev(after, model(*inputs)) <= TOL
        assert _max_dev(after, before) > 1e-3


def test_bad_settings_name_the_valid_ones():
    with pytest.raises(OptionError, match="unknown option.*'trials'.*Valid options: passes"):
        slimc.dynamo.backend(trials=10)
    with pytest.raises(OptionError, match="Unknown pass 'nope'"):
        slimc.dynamo.backend(passes=["nope"])
    with pytest.raises(OptionError, match="target 'cuda'"):
        slimc.dynamo.backend(target="cuda")
    with pytest.raises(OptionError, match="max_shapes"):
        slimc.dynamo.backend(max_shapes=0)


def test_entry_point_registers_the_name_without_importing_slimc():
    # a fresh interpreter: torch finds "slimc" through the torch_dynamo_backends entry point
    code = ("import sys, torch; from torch._dynamo.backends.registry import lookup_backend; "
            "f = lookup_backend('slimc'); print(f.__module__, 'slimc.dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["slimc.dynamo", "True"]


def test_threads_share_a_compiled_module_and_bad_ids_raise_index_error():
    import threading
    model, inputs, _ = ZOO["bert"]()
    b = slimc.dynamo.backend()
    compiled = torch.compile(model, backend=b)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", SlimcFallbackWarning)
        want = compiled(*inputs)
        assert _max_dev(want, model(*inputs)) <= TOL
        results, errors = [], []
        barrier = threading.Barrier(8)

        def work():
            barrier.wait()
            with torch.no_grad():
                for _ in range(10):
                    try:
                        results.append(compiled(*inputs).clone())
                    except Exception as e:  # noqa: BLE001 - asserted below
                        errors.append(e)

        pool = [threading.Thread(target=work) for _ in range(8)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert not errors, errors[:3]
        assert len(results) == 80 and all(torch.equal(r, want) for r in results)
        assert all(s.eager_reason is None for s in b.subgraphs)
        # an id past the vocabulary: eager torch raises IndexError, and so does the build
        bad = inputs[0].clone()
        bad[0, 2] = 10_000
        with pytest.raises(IndexError):
            model(bad)
        with pytest.raises(IndexError, match="holds 10000 at position"):
            compiled(bad)
