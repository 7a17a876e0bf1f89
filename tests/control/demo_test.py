"""``ferry demo-image`` (the image-level demo) on a small realistic image: every restore verified, nothing left."""

from __future__ import annotations

from pathlib import Path

from control import demo


def test_demo_small(tmp_path: Path) -> None:
    rows = demo.run(size="64M", fill=0.5, workdir=str(tmp_path), show_progress=False)
    by_step = {r.step: r for r in rows}
    full, changed, reread = (by_step[s] for s in ("backup full", "backup changed", "backup re-read"))
    assert full.kind == "full" and changed.kind == "incremental" and reread.kind == "incremental"
    assert 0 < changed.read < full.read / 10  # only the changed extents were read
    assert reread.read >= full.read  # the re-read reads everything again ...
    assert reread.stored == 0  # ... and stores nothing new: the --changed backup stored the changes
    assert [r.ok for r in rows if r.step.startswith("restore")] == ["identical"] * 3
    assert rows[-1].ok == "clean"
    assert list(tmp_path.iterdir()) == []  # the demo removed its files
    demo.print_table(rows)
