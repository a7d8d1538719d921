"""TensorBoard scalar events written without TensorFlow or the tensorboard package.

Runs that never import TensorFlow (image folders read by Grain, hosts without TensorFlow) still
get ``WORKDIR/tensorboard/events.out.tfevents.*``. An event file is a TFRecord file of
``Event`` protocol buffers; the few fields a scalar needs are encoded here by hand, as the
TensorFlow writer encodes them (a float tensor with the ``scalars`` plugin's metadata), so
TensorBoard and ``tf.compat.v1.train.summary_iterator`` read them alike.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Mapping

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


def scalar_writer(logdir: str) -> Callable[[int | None, Mapping[str, float]], None]:
    """``write(step, {tag: value})`` appending to a new event file in ``logdir``; ``step=None``
    closes it."""
    directory = epath.Path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.notf"
    f = (directory / name).open("wb")
    f.write(_record(_event(0, now, file_version="brain.Event:2")))
    f.flush()

    def write(step, scalars):
        if step is None:
            f.close()
            return
        summary = b"".join(_bytes(1, _scalar_value(tag, float(v))) for tag, v in scalars.items())
        f.write(_record(_event(int(step), time.time(), summary)))
        f.flush()

    return write
