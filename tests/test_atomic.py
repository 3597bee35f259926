"""Atomic writes: all or nothing, unique temp files, nothing left behind."""

import json

import pytest

from morpheus_jax.core import atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out" / "report.json"
    atomic.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic.replacing(path) as tmp:
            tmp.write_text('{"a": 2, "trunc')
            raise RuntimeError("mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_temp_names_are_unique_hidden_and_not_matched_by_suffix_globs(tmp_path):
    path = tmp_path / "metrics.csv"
    names = {atomic.temp_path(path).name for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith(".metrics.csv.tmp-") for n in names)
    # Two writers of one path interleaved: each rename is whole; the last one wins.
    with atomic.replacing(path) as a, atomic.replacing(path) as b:
        assert a != b
        a.write_text("first\n")
        b.write_text("second\n")
    assert path.read_text() == "first\n"  # `a` exits last (contexts unwind inner first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_csv_and_figure_writers(tmp_path):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"x": [1.5, 2.0], "y": ["a", "b"]})
    atomic.write_csv(tmp_path / "t.csv", frame)
    assert (tmp_path / "t.csv").read_text() == "x,y\n1.5,a\n2.0,b\n"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure()
    atomic.save_figure(fig, tmp_path / "f.png")
    atomic.save_figure(fig, tmp_path / "f.pdf")
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pdf", "f.png", "t.csv"]
