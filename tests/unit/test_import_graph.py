"""The module graph stays acyclic and layered, with no project import hidden in a function (bench/import_graph.py)."""

from __future__ import annotations

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
