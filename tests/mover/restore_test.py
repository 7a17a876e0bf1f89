"""Restore planning: the runs of zero and data blocks found from the manifest's id array."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mover.kernels import ID_SIZE, ZERO_ID
from mover.restore import _runs


class Ids:
    """A manifest as the ``Manifest`` protocol has it: ids by index only."""

    def __init__(self, ids: list[bytes], step: int) -> None:
        self.ids = ids
        self.step = step

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> bytes:
        return self.ids[i]


class SlicedIds(Ids):
    """A manifest like the store's, its id array also served in slices (of ``step`` ids: runs cross them)."""

    def chunks(self) -> list[memoryview]:
        raw = memoryview(b"".join(self.ids))
        return [raw[i : i + self.step * ID_SIZE] for i in range(0, len(raw), self.step * ID_SIZE)]


def ref_runs(ids: list[bytes]) -> list[tuple[int, int, bool]]:
    out: list[tuple[int, int, bool]] = []
    for i, bid in enumerate(ids):
        zero = bid == ZERO_ID
        if out and out[-1][2] == zero:
            out[-1] = (out[-1][0], i + 1, zero)
        else:
            out.append((i, i + 1, zero))
    return out


@given(st.lists(st.booleans(), max_size=60), st.integers(1, 7), st.booleans())
def test_runs_match_reference(zeros: list[bool], step: int, sliced: bool) -> None:
    # a data id with zero bytes in it, so only whole ZERO_IDs count
    ids = [ZERO_ID if z else bytes(31) + bytes([i % 255 + 1]) for i, z in enumerate(zeros)]
    manifest = (SlicedIds if sliced else Ids)(ids, step)
    assert list(_runs(manifest)) == ref_runs(ids)  # type: ignore[arg-type]
