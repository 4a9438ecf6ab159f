"""The .pyi stubs describe the extension: every public name is stubbed with the same parameters."""

import ast
import inspect
from pathlib import Path

import ferrodiff
import ferrodiff._core as core

STUB = Path(ferrodiff.__file__).with_name("_core.pyi")


def stub_signatures():
    tree = ast.parse(STUB.read_text())
    out = {}

    def params(fn):
        a = fn.args
        names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
        names += [v.arg for v in (a.vararg, a.kwarg) if v is not None]
        return [n for n in names if n not in ("self", "cls")]

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = params(node)
        elif isinstance(node, ast.ClassDef):
            # a stubbed subclass inherits its stubbed base's methods, as at run time
            inherited = {}
            for base in node.bases:
                if isinstance(base, ast.Name) and isinstance(out.get(base.id), dict):
                    inherited.update(out[base.id])
            own = {n.name: params(n) for n in node.body if isinstance(n, ast.FunctionDef)}
            out[node.name] = {**inherited, **own}
    return out


def runtime_params(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    names = [p for p in sig.parameters if p not in ("self", "cls", "$self", "$cls")]
    if names == ["args", "kwargs"]:
        return None  # slot wrappers (e.g. __call__) carry no text signature
    return names


def test_py_typed_marker_is_shipped():
    assert Path(ferrodiff.__file__).with_name("py.typed").exists()


def test_every_public_name_of_the_extension_is_stubbed_with_matching_parameters():
    stubs = stub_signatures()
    public = [n for n in dir(core) if not n.startswith("_")]
    missing = [n for n in public if n not in stubs]
    assert not missing, f"not in _core.pyi: {missing}"
    mismatches = []
    for name in public:
        obj = getattr(core, name)
        if inspect.isclass(obj):
            for meth, stub_params in stubs[name].items():
                if meth.startswith("__") and meth not in ("__init__", "__call__"):
                    continue
                target = obj if meth == "__init__" else getattr(obj, meth, None)
                assert target is not None, f"{name}.{meth} is stubbed but does not exist"
                if (
                    isinstance(inspect.getattr_static(obj, meth, None), property)
                    or type(inspect.getattr_static(obj, meth, None)).__name__ == "getset_descriptor"
                ):
                    continue
                rp = runtime_params(target)
                if rp is not None and rp != stub_params:
                    mismatches.append(f"{name}.{meth}: runtime {rp} vs stub {stub_params}")
            for attr in dir(obj):
                if not attr.startswith("_") and attr not in stubs[name]:
                    mismatches.append(f"{name}.{attr} is not stubbed")
        elif callable(obj):
            rp = runtime_params(obj)
            if rp is not None and rp != stubs[name]:
                mismatches.append(f"{name}: runtime {rp} vs stub {stubs[name]}")
    assert not mismatches, "\n".join(mismatches)
