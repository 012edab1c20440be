"""``loggers._crc32c``: the numpy CRC-32C equals TensorBoard's, and the per-writer switch is scoped and safe."""

from __future__ import annotations

import glob
import os
import random
import struct

import numpy as np
import pytest
import torch
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_stub
from tensorboard.summary.writer import record_writer as tb_record_writer
from torch.utils.tensorboard import SummaryWriter

from lightning_introspect.loggers import _crc32c
from lightning_introspect.loggers._crc32c import NUMPY_MIN_BYTES, crc32c, masked_crc32c, use_fast_crc
from lightning_introspect.loggers.adapter import TensorBoardWriter
from tests.helpers import read_events

STOCK_WRITE = tb_record_writer.RecordWriter.write
STOCK_MASKED = tb_record_writer.masked_crc32c


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _record_writer(sw: SummaryWriter):  # noqa: ANN202
    return sw.file_writer.event_writer._async_writer._writer


def _records(log_dir: str) -> list[tuple[str, int, bytes, bytes]]:
    """Every record of the event files: (path, offset, 12-byte header incl. its CRC, data + 4-byte CRC)."""
    out = []
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        raw = open(path, "rb").read()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            out.append((path, pos, raw[pos : pos + 12], raw[pos + 12 : pos + 16 + length]))
            pos += 16 + length
    return out


def _stock_checks(header: bytes, body: bytes) -> bool:
    """TensorBoard's own (pure-Python) CRC check of one record."""
    return (
        tb_stub.masked_crc32c(header[:8]) == struct.unpack("<I", header[8:])[0]
        and tb_stub.masked_crc32c(body[:-4]) == struct.unpack("<I", body[-4:])[0]
    )


# ------------------------------------------------------------------------------------------ the maths
def test_known_vectors():
    # the classic check value and the RFC 3720 (iSCSI) test vectors
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"\x00" * 32) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"") == 0 and masked_crc32c(b"") == tb_stub.masked_crc32c(b"")


@pytest.mark.parametrize(
    "n", [0, 1, 3, 4, 5, 8, 127, 128, 129, 255, 256, 257, 1023, 2049, 4096, 16384, 16385, 32775, 100_003]
)
def test_equals_tensorboard_masked_crc32c(n):
    data = _bytes(n, n)
    assert masked_crc32c(data) == tb_stub.masked_crc32c(data)
    assert crc32c(data) == tb_stub.crc32c(data)


def test_large_inputs_across_chunks_equal_the_byte_loop():
    # > 128 KiB crosses the gather chunks and several 16 KiB groups; the byte loop is checked against
    # TensorBoard's in the test above, and is ~4x faster than it
    for n in (300_001, 262_144):
        data = _bytes(n, 7)
        assert crc32c(data) == _crc32c._crc_loop(data, 0xFFFFFFFF) ^ 0xFFFFFFFF


def test_continuation_and_buffer_types():
    data = _bytes(5000, 3)
    for cut in (0, 3, 4, NUMPY_MIN_BYTES - 1, NUMPY_MIN_BYTES, 777, 4999, 5000):
        assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)
    assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == crc32c(np.frombuffer(data, np.uint8)) == crc32c(data)
    # a single flipped bit anywhere changes the checksum
    flipped = bytearray(data)
    flipped[2500] ^= 0x10
    assert crc32c(flipped) != crc32c(data)


# ------------------------------------------------------------------------------- the writer switch
def test_fast_writer_round_trip_passes_tensorboards_crc_checks(tmp_path):
    import matplotlib.pyplot as plt

    sw = SummaryWriter(str(tmp_path))
    writer = TensorBoardWriter(sw)
    assert type(_record_writer(sw)).__name__ == "FastCrcRecordWriter"
    gen = torch.Generator().manual_seed(0)
    writer.scalar("introspect/t/s", 1.5, 3)
    writer.image("introspect/t/noise", torch.rand(3, 160, 160, generator=gen), 3)  # ~75 KB PNG: the numpy path
    fig, ax = plt.subplots()
    ax.plot([0, 1, 0])
    writer.figure("introspect/t/fig", fig, 3)
    with writer.batch():
        for i in range(40):
            writer.histogram(f"introspect/t/h{i}", [i, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0], 3, min=0.0, max=3.0,
                             num=i + 3.0, sum=1.0, sum_squares=2.0)
    writer.text("introspect/t/md", "hello", 3)
    sw.close()

    records = _records(str(tmp_path))
    assert max(len(body) for _, _, _, body in records) > 50_000  # the large records really were checked
    assert all(_stock_checks(header, body) for _, _, header, body in records)
    ev = read_events(str(tmp_path))
    assert ev["scalars"]["introspect/t/s"] == [(3, 1.5)]
    assert {"introspect/t/noise", "introspect/t/fig"} <= set(ev["images"])
    assert len(ev["histograms"]) == 40 and ev["histograms"]["introspect/t/h7"] == [(3, [7.0, 1.0, 2.0])]
    assert "introspect/t/md/text_summary" in ev["text"]


def test_a_corrupted_record_is_rejected_by_tensorboard(tmp_path):
    # the check above can fail: flip one byte of the big image record and TensorBoard refuses it
    from tensorboard.compat.tensorflow_stub.errors import DataLossError

    sw = SummaryWriter(str(tmp_path))
    writer = TensorBoardWriter(sw)
    writer.image("introspect/t/noise", torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1)), 1)
    writer.scalar("introspect/t/after", 2.0, 1)
    sw.close()
    path, offset, header, body = max(_records(str(tmp_path)), key=lambda r: len(r[3]))
    raw = bytearray(open(path, "rb").read())
    raw[offset + 12 + len(body) // 2] ^= 0x01
    open(path, "wb").write(bytes(raw))
    assert not _stock_checks(header, bytes(raw[offset + 12 : offset + 12 + len(body)]))
    reader = tb_stub.PyRecordReader_New(path)
    with pytest.raises(DataLossError, match="crc32"):
        for _ in range(10):
            reader.GetNext()
    ev = read_events(str(tmp_path))  # the loader stops at the bad record: nothing after it is read
    assert "introspect/t/noise" not in ev["images"] and "introspect/t/after" not in ev["scalars"]


def test_only_our_writer_changes_nothing_global(tmp_path):
    ours, other = SummaryWriter(str(tmp_path / "a")), SummaryWriter(str(tmp_path / "b"))
    TensorBoardWriter(ours)
    assert type(_record_writer(ours)).__name__ == "FastCrcRecordWriter"
    assert type(_record_writer(other)) is tb_record_writer.RecordWriter
    assert tb_record_writer.RecordWriter.write is STOCK_WRITE
    assert tb_record_writer.masked_crc32c is STOCK_MASKED is tb_stub.masked_crc32c
    other.add_scalar("x", 1.0, 0)
    ours.close()
    other.close()
    assert all(_stock_checks(h, b) for _, _, h, b in _records(str(tmp_path)))


def test_switch_is_idempotent_and_follows_a_reopened_writer(tmp_path):
    sw = SummaryWriter(str(tmp_path))
    assert use_fast_crc(sw) and use_fast_crc(sw)
    first = _record_writer(sw)
    writer = TensorBoardWriter(sw)
    assert _record_writer(sw) is first and type(first).__name__ == "FastCrcRecordWriter"
    sw.close()  # closed: nothing to switch, no error
    assert use_fast_crc(sw) is False
    writer.image("introspect/t/img", torch.rand(3, 64, 64), 5)  # reopens a new event file
    assert _record_writer(sw) is not first and type(_record_writer(sw)).__name__ == "FastCrcRecordWriter"
    sw.close()
    records = _records(str(tmp_path))
    assert len({path for path, *_ in records}) == 2 and all(_stock_checks(h, b) for _, _, h, b in records)


def test_unexpected_internals_keep_the_stock_writer(tmp_path, monkeypatch):
    class NotAWriter:
        pass

    assert use_fast_crc(NotAWriter()) is False
    assert use_fast_crc(None) is False

    # the worker thread holds another record writer than expected -> untouched
    sw = SummaryWriter(str(tmp_path / "a"))
    async_writer = sw.file_writer.event_writer._async_writer
    monkeypatch.setattr(async_writer._worker, "_record_writer", object())
    assert use_fast_crc(sw) is False and type(async_writer._writer) is tb_record_writer.RecordWriter
    monkeypatch.undo()
    sw.close()

    # a record writer of another class (someone else's subclass) -> untouched
    class Custom(tb_record_writer.RecordWriter):
        pass

    sw = SummaryWriter(str(tmp_path / "b"))
    _record_writer(sw).__class__ = Custom
    writer = TensorBoardWriter(sw)
    assert type(_record_writer(sw)) is Custom
    writer.scalar("introspect/t/s", 1.0, 0)
    sw.close()
    assert read_events(str(tmp_path / "b"))["scalars"]["introspect/t/s"] == [(0, 1.0)]

    # the self-check fails (e.g. an exotic platform) -> untouched, logging still works
    monkeypatch.setattr(_crc32c, "_SELF_CHECK", False)
    sw = SummaryWriter(str(tmp_path / "c"))
    writer = TensorBoardWriter(sw)
    assert type(_record_writer(sw)) is tb_record_writer.RecordWriter
    writer.scalar("introspect/t/s", 2.0, 1)
    sw.close()
    assert read_events(str(tmp_path / "c"))["scalars"]["introspect/t/s"] == [(1, 2.0)]
