import data
import shards
from data import ParquetFileCache, list_units


def test_from_text_round_trip(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("line one\nline two\n" * 20000)
    b.write_text("short file")
    assert data.main(["--from-text", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    units = list_units(tmp_path / "out", "text")
    assert len(units) > 1  # long files become several documents and row groups
    cache = ParquetFileCache(2)
    docs = [d.as_py() for u in units
            for d in cache.get(u.path).read_row_group(u.row_group, columns=["text"]).column(0)]
    assert "".join(docs) == a.read_text() + b.read_text()


def test_sample_corpus_is_deterministic(tmp_path):
    shards.build_stdlib_corpus(tmp_path / "one", max_bytes=200_000)
    shards.build_stdlib_corpus(tmp_path / "two", max_bytes=200_000)
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one and one == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert len(list_units(tmp_path / "one", "text")) >= 1


def test_split_text_keeps_every_character():
    text = "".join(f"line {i}\n" for i in range(3000))
    pieces = shards.split_text(text, 1000)
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces)
    assert shards.split_text(text, 0) == [text] and shards.split_text("", 100) == []
