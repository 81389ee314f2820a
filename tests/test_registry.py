"""The one ``Registry``: lazy ``"module:object"`` entries, declared attributes, refusals with clear errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from selfextend.backends import BACKENDS, available_backends, check_backend_name
from selfextend.registry import Registry


class Thing:
    name = "thing"
    methods = ("a",)


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """The name of a fresh module defining ``Probe`` (methods ``("a",)``), on sys.path but not imported."""
    name = f"registry_probe_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        class Probe:
            name = "probe"
            methods = ("a",)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_lazy_entry_is_imported_on_first_lookup_only(probe):
    reg = Registry("widget")
    reg.add("lazy", f"{probe}:Probe", methods=("a",))
    assert "lazy" in reg and reg.names() == ["lazy"] and list(reg) == ["lazy"]
    assert reg.peek("lazy", "methods") == ("a",)  # declared: answered without the import
    assert probe not in sys.modules
    entry = reg["lazy"]
    assert probe in sys.modules
    assert type(entry).__name__ == "Probe" and entry.name == "lazy"  # a class is stored as an instance
    assert reg["lazy"] is entry and reg.peek("lazy", "name") == "lazy"


def test_undeclared_attribute_loads_the_entry(probe):
    reg = Registry("widget")
    reg.add("lazy", f"{probe}:Probe")
    assert reg.peek("lazy", "methods") == ("a",)
    assert probe in sys.modules


@pytest.mark.parametrize(("target", "message"), [
    ("registry_probe_absent:Probe",
     r"'registry_probe_absent:Probe', but registry_probe_absent cannot be imported"),
    ("selfextend.registry:Absent", r"'selfextend.registry:Absent', but selfextend.registry has no 'Absent'"),
])
def test_a_lazy_target_that_does_not_resolve_names_itself(target, message):
    reg = Registry("widget")
    reg.add("broken", target)
    with pytest.raises(ImportError, match=rf"widget 'broken' is registered as {message}"):
        reg["broken"]
    assert "broken" in reg  # still the placeholder: the next lookup raises the same error


@pytest.mark.parametrize("target", ["no_colon", "module:", ":Object", "a:b:c"])
def test_a_malformed_lazy_target_is_refused_when_added(target):
    with pytest.raises(ValueError, match=rf"lazy widget 'x' must be 'module:object', got '{target}'"):
        Registry("widget").add("x", target)


def test_a_declaration_that_disagrees_with_the_class_is_refused_on_load(probe):
    reg = Registry("widget")
    reg.add("lazy", f"{probe}:Probe", methods=("a", "b"))
    with pytest.raises(ValueError, match=r"has methods=\('a',\), but its registration declares "
                                         r"methods=\('a', 'b'\)"):
        reg["lazy"]


def test_duplicate_names_are_refused():
    reg = Registry("widget")
    reg.register()(Thing)
    with pytest.raises(ValueError, match="widget 'thing' is already registered; pick another name"):
        reg.add("thing", Thing())
    reg.add("later", "selfextend.registry:Registry")
    with pytest.raises(ValueError, match=r"'later' is already registered \(lazily, as "
                                         r"'selfextend.registry:Registry'\)"):
        reg.register("later")(Thing)


def test_unknown_name_lists_the_choices_and_base_class_is_checked(probe):
    reg = Registry("widget", base=Thing)
    reg.add("one", Thing())
    with pytest.raises(ValueError, match=r"Unknown widget 'two'. Available: one."):
        reg["two"]
    with pytest.raises(TypeError, match="widget 'int' must be a Thing, got int"):
        reg.add("int", 3)
    reg.add("lazy", f"{probe}:Probe")
    with pytest.raises(TypeError, match=rf"widget 'lazy' \({probe}:Probe\) must be a Thing, got Probe"):
        reg["lazy"]


def test_gpu_backends_declare_what_their_classes_say():
    assert {"flex", "triton"} <= set(available_backends())
    assert check_backend_name("triton") == "triton"
    with pytest.raises(ValueError, match="Backend 'flex' does not run dca"):
        check_backend_name("flex", "dca")
    for name in BACKENDS:
        assert BACKENDS[name].methods == BACKENDS.peek(name, "methods")  # loading checks the declaration


@pytest.mark.slow  # a fresh interpreter: the only way to see what ``import selfextend`` itself imports
def test_import_selfextend_leaves_the_gpu_backends_unimported():
    code = ("import sys, selfextend; selfextend.available_backends('dca'); "
            "print(sorted(m for m in sys.modules if m.startswith('selfextend.backends.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "selfextend.backends.composed" in out
    for lazy in ("flex", "triton", "triton_kernel"):
        assert f"selfextend.backends.{lazy}'" not in out
