"""The module graph stays acyclic and layered, with no project import hidden in a function (bench/import_graph.py);
and a command starts without the third-party packages only some of its work needs."""

from __future__ import annotations

import subprocess
import sys

from bench_scripts import load_bench


def test_the_project_graph_has_no_cycle_and_keeps_its_layers(capsys):
    graph = load_bench("import_graph")
    code = graph.main([])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "module cycles: 0" in out and "package cycles: 0" in out and "project imports inside functions: 0" in out


def test_the_checker_sees_a_cycle_and_an_import_inside_a_function(tmp_path, monkeypatch):
    graph = load_bench("import_graph")
    for pkg in graph.PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "online_models" / "a.py").write_text("from online_models import b\n")
    (tmp_path / "online_models" / "b.py").write_text("def f():\n    from online_models import a\n")
    (tmp_path / "online_models" / "c.py").write_text("import stream.x\n")
    (tmp_path / "stream" / "x.py").write_text("import online_models.c\n")
    monkeypatch.setattr(graph, "ROOT", tmp_path)
    mods = graph.modules()
    edges = {m: graph.imports_of(m, p, set(mods)) for m, p in mods.items()}
    assert ("online_models.a", 2, True) in edges["online_models.b"]
    graph_ = {m: {t for t, _, _ in e} for m, e in edges.items()}
    assert ["online_models.a", "online_models.b"] in graph.cycles(graph_)
    assert graph.main([]) == 1


def test_a_command_starts_without_onnx_or_river(tmp_path):
    """onnx (with ml_dtypes, which it loads: 0.7-0.9 s here) is imported where the text model's
    graph is built, River (with scipy.special: about 0.25 s) where an MF learner is made; not by
    every process that imports the CLI, the worker's app or the replay tool, as ``streamrec
    --help``, ``produce`` and ``tail`` do without ever needing them. A fresh interpreter, as a
    command starts."""
    code = ("import sys, stream.cli, stream.app, stream.produce, stream.tail, online_models.search; "
            "print(sorted(m for m in ('onnx', 'ml_dtypes', 'river', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "[]"


def test_the_vector_index_imports_without_crashing_onnx_runtime(tmp_path):
    """usearch's extension loaded before ONNX Runtime's makes importing ONNX Runtime crash the
    interpreter (SIGSEGV), unless scipy or onnx was loaded first, as they were at every start
    before both became lazy: online_models/search/semantic.py loads ONNX Runtime first."""
    code = "import online_models.search.semantic, onnxruntime, online_models.search; print('loaded')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert out.stdout.strip() == "loaded"
