"""TensorBoard scalar events written without TensorFlow or the tensorboard package.

Every run writes its ``WORKDIR/tensorboard/events.out.tfevents.*`` this way, local or ``gs://``,
with or without TensorFlow installed (image folders read by Grain never import it). An event
file is a TFRecord file of ``Event`` protocol buffers; the few fields a scalar needs are encoded
here by hand, as the TensorFlow writer encodes them (a float tensor with the ``scalars`` plugin's
metadata), so TensorBoard and ``tf.compat.v1.train.summary_iterator`` read them alike.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence

from etils import epath

# --- protocol buffer wire format --------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(step: int, wall_time: float, summary: bytes = b"", file_version: str = "") -> bytes:
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        msg += _bytes(3, file_version.encode())
    if summary:
        msg += _bytes(5, summary)
    return msg


def _scalar_value(tag: str, value: float) -> bytes:
    """``Summary.Value``: tag, metadata (plugin 'scalars'), tensor (DT_FLOAT, one float_val)."""
    metadata = _bytes(1, _bytes(1, b"scalars"))  # SummaryMetadata.plugin_data.plugin_name
    tensor = _field(1, 0, _varint(1)) + _bytes(2, b"") + _bytes(5, struct.pack("<f", value))
    return _bytes(1, tag.encode()) + _bytes(8, tensor) + _bytes(9, metadata)


# --- TFRecord framing -------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _summary(scalars: Mapping[str, float]) -> bytes:
    return b"".join(_bytes(1, _scalar_value(tag, float(v))) for tag, v in scalars.items())


def _header(wall_time: float) -> bytes:
    return _record(_event(0, wall_time, file_version="brain.Event:2"))


def event_file(events: Sequence[tuple[float, int, Mapping[str, float]]]) -> bytes:
    """A whole event file of ``(wall_time, step, {tag: value})`` events: for storage that cannot
    append (a ``gs://`` workdir writes one file per metrics segment)."""
    body = b"".join(_record(_event(int(step), wall, _summary(s))) for wall, step, s in events)
    return _header(events[0][0]) + body


def scalar_writer(logdir: str) -> Callable[[int | None, Mapping[str, float]], None]:
    """``write(step, {tag: value})`` appending to a new event file in ``logdir``; ``step=None``
    closes it."""
    directory = epath.Path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.notf"
    f = (directory / name).open("wb")
    f.write(_header(now))
    f.flush()

    def write(step, scalars):
        if step is None:
            f.close()
            return
        f.write(_record(_event(int(step), time.time(), _summary(scalars))))
        f.flush()

    return write
